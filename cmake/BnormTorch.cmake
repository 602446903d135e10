# Finding PyPI's torch for the targets that link libtorch (adapters/torch, the Python package's
# operators). We do not call find_package(Torch): the PyPI wheel is a CUDA build whose
# TorchConfig.cmake wants a CUDA toolkit at configure time and links libtorch_cuda; bnorm needs only
# libtorch_cpu and libc10, and must configure on machines without a GPU or CUDA toolkit.
#
# bnorm_find_torch(<python> <found_var>) looks in <python>'s site-packages (or BNORM_TORCH_DIR) and,
# when torch is there, defines the interface target bnorm_torch_deps (once): torch's headers as
# SYSTEM headers (so -Werror applies to our code only), its C++ ABI macro, the two libraries and
# their rpath. <found_var> is set to TRUE or FALSE in the caller's scope.
set(BNORM_TORCH_DIR "" CACHE PATH "torch package folder (default: from the python given to bnorm_find_torch)")

function(bnorm_find_torch python found_var)
  if(TARGET bnorm_torch_deps)
    set(${found_var} TRUE PARENT_SCOPE)
    return()
  endif()
  set(dir "${BNORM_TORCH_DIR}")
  if(NOT dir AND python)
    execute_process(
      COMMAND ${python} -c "import os, torch.utils; print(os.path.dirname(os.path.dirname(torch.utils.cmake_prefix_path)))"
      OUTPUT_VARIABLE torch_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE torch_rc)
    if(torch_rc EQUAL 0 AND EXISTS "${torch_dir}/include/ATen/ATen.h")
      set(dir "${torch_dir}")
    endif()
  endif()
  if(dir)
    find_library(BNORM_TORCH_CPU torch_cpu PATHS "${dir}/lib" NO_DEFAULT_PATH)
    find_library(BNORM_TORCH_C10 c10 PATHS "${dir}/lib" NO_DEFAULT_PATH)
  endif()
  if(NOT dir OR NOT BNORM_TORCH_CPU OR NOT BNORM_TORCH_C10)
    set(${found_var} FALSE PARENT_SCOPE)
    return()
  endif()
  set(abi 1)
  if(python)
    execute_process(COMMAND ${python} -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
                    OUTPUT_VARIABLE torch_abi OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(torch_abi MATCHES "^[01]$")
      set(abi ${torch_abi})
    endif()
  endif()
  message(STATUS "bnorm: libtorch from ${dir}")
  add_library(bnorm_torch_deps INTERFACE)
  target_include_directories(bnorm_torch_deps SYSTEM INTERFACE
    "${dir}/include" "${dir}/include/torch/csrc/api/include")
  target_compile_definitions(bnorm_torch_deps INTERFACE _GLIBCXX_USE_CXX11_ABI=${abi})
  target_link_libraries(bnorm_torch_deps INTERFACE ${BNORM_TORCH_CPU} ${BNORM_TORCH_C10})
  target_link_options(bnorm_torch_deps INTERFACE "LINKER:-rpath,${dir}/lib")
  set(${found_var} TRUE PARENT_SCOPE)
endfunction()

# The torch operators' sources (adapters/torch, docs/architecture.md): linked into the libtorch
# adapter (bnorm_torch) and built as the Python package's bnorm/libbnorm_torch_ops.so.
set(BNORM_TORCH_OPS_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/../adapters/torch/registration.cpp
  ${CMAKE_CURRENT_LIST_DIR}/../adapters/torch/tensor_rules.cpp
  ${CMAKE_CURRENT_LIST_DIR}/../adapters/torch/cpu.cpp
  ${CMAKE_CURRENT_LIST_DIR}/../adapters/torch/meta.cpp
  ${CMAKE_CURRENT_LIST_DIR}/../adapters/torch/autograd.cpp
  ${CMAKE_CURRENT_LIST_DIR}/../adapters/torch/process_group.cpp)
