// Small text helpers shared by bnorm-train's files.
#pragma once

#include <cstdio>
#include <sstream>
#include <string>

namespace bnorm::train {

// The arguments streamed one after the other into a string.
template <class... A>
std::string cat(const A&... a) {
  std::ostringstream o;
  (o << ... << a);
  return o.str();
}

// One number through a printf format.
inline std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

}  // namespace bnorm::train
