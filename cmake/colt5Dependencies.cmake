# LibTorch: from CMAKE_PREFIX_PATH (Debian's libtorch-dev is found by default;
# for a PyTorch install pass -DCMAKE_PREFIX_PATH=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')).
# A CUDA LibTorch adds nvcc flags for its own architecture list (down to
# compute_50, which nvcc 13 rejects) unless given one: our kernels target
# Hopper with PTX for newer GPUs (COLT5_CUDA_ARCHS).
if(NOT DEFINED TORCH_CUDA_ARCH_LIST AND NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(TORCH_CUDA_ARCH_LIST "9.0")
endif()
find_package(Torch REQUIRED)
# TorchConfig finds some libraries (c10, ...) with default search paths first,
# so a second LibTorch installed system-wide (Debian's) can shadow the one
# found here: take each from this LibTorch's own lib/ when it is there.
set(_colt5_torch_libs)
foreach(_lib IN LISTS TORCH_LIBRARIES)
  if(IS_ABSOLUTE "${_lib}" AND NOT _lib MATCHES "^${TORCH_INSTALL_PREFIX}/")
    get_filename_component(_name "${_lib}" NAME)
    if(EXISTS "${TORCH_INSTALL_PREFIX}/lib/${_name}")
      set(_lib "${TORCH_INSTALL_PREFIX}/lib/${_name}")
    endif()
  endif()
  list(APPEND _colt5_torch_libs "${_lib}")
endforeach()
set(TORCH_LIBRARIES ${_colt5_torch_libs})
message(STATUS "colt5: LibTorch ${Torch_VERSION} from ${Torch_DIR}")

# CUDA kernels when the Torch found has CUDA (or when asked for).
set(COLT5_WITH_CUDA OFF)
if(COLT5_CUDA STREQUAL "ON" OR (COLT5_CUDA STREQUAL "AUTO" AND CAFFE2_USE_CUDA))
  if(NOT CAFFE2_USE_CUDA)
    message(FATAL_ERROR "COLT5_CUDA=ON but the Torch found (${Torch_DIR}) was built without CUDA")
  endif()
  enable_language(CUDA)
  set(COLT5_WITH_CUDA ON)
endif()
message(STATUS "colt5: CUDA kernels ${COLT5_WITH_CUDA}")

# Header-only and test dependencies: the system's, else the vendored copies.
if(EXISTS "${COLT5_THIRD_PARTY}/include")
  list(APPEND CMAKE_PREFIX_PATH "${COLT5_THIRD_PARTY}")
endif()
find_package(nlohmann_json 3 QUIET)
if(NOT nlohmann_json_FOUND)
  if(NOT EXISTS "${COLT5_THIRD_PARTY}/include/nlohmann/json.hpp")
    message(FATAL_ERROR "nlohmann-json not found: install nlohmann-json3-dev or run scripts/vendor.sh")
  endif()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${COLT5_THIRD_PARTY}/include")
endif()
find_package(CLI11 QUIET)
if(NOT CLI11_FOUND)
  if(NOT EXISTS "${COLT5_THIRD_PARTY}/include/CLI/CLI.hpp")
    message(FATAL_ERROR "CLI11 not found: install libcli11-dev or run scripts/vendor.sh")
  endif()
  add_library(CLI11::CLI11 INTERFACE IMPORTED)
  set_target_properties(CLI11::CLI11 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${COLT5_THIRD_PARTY}/include")
endif()
