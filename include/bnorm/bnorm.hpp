// bnorm: Batch Normalization for the CPU. One include for the whole public API.
#pragma once

#include <bnorm/distributed.hpp>
#include <bnorm/fold.hpp>
#include <bnorm/functional.hpp>
#include <bnorm/layer.hpp>
#include <bnorm/population.hpp>
#include <bnorm/types.hpp>
