# cmake -DMODE=install|subdirectory -D... -P run_consumer.cmake  (arguments: tests/install/CMakeLists.txt)
#
# install:      cmake --install <dchag build> --prefix <work>/prefix, then the consumer finds it
#               through CMAKE_PREFIX_PATH alone.
# subdirectory: the consumer adds the dchag source tree with add_subdirectory().
# Either way the consumer is configured with the compiler, Kokkos and Kokkos Kernels of the dchag
# build, built, and run.
cmake_minimum_required(VERSION 3.16)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  string(REPLACE ";" " " cmd "${ARGN}")
  message("$ ${cmd}\n${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}")
  endif()
  set(out "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(build "${WORK_DIR}/build")
set(args
  -S "${CONSUMER_DIR}" -B "${build}" -G "${GENERATOR}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DKokkos_DIR=${Kokkos_DIR}"
  "-DKokkosKernels_DIR=${KokkosKernels_DIR}")
if(BUILD_TYPE)
  list(APPEND args "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}")
endif()
if(CXX_COMPILER_LAUNCHER)
  list(APPEND args "-DCMAKE_CXX_COMPILER_LAUNCHER=${CXX_COMPILER_LAUNCHER}")
endif()

if(MODE STREQUAL "install")
  set(prefix "${WORK_DIR}/prefix")
  set(install_args --install "${DCHAG_BINARY_DIR}" --prefix "${prefix}")
  if(BUILD_TYPE)
    list(APPEND install_args --config "${BUILD_TYPE}")
  endif()
  run("${CMAKE_COMMAND}" ${install_args})
  run("${CMAKE_COMMAND}" ${args} "-DCMAKE_PREFIX_PATH=${prefix}")
  # The package must come from the scratch prefix, not from a copy installed elsewhere.
  file(STRINGS "${build}/CMakeCache.txt" dchag_dir REGEX "^dchag_DIR:")
  string(FIND "${dchag_dir}" "${prefix}/" at)
  if(NOT at GREATER -1)
    message(FATAL_ERROR "dchag was not found in ${prefix}: ${dchag_dir}")
  endif()
elseif(MODE STREQUAL "subdirectory")
  run("${CMAKE_COMMAND}" ${args} "-DDCHAG_SOURCE_DIR=${DCHAG_SOURCE_DIR}"
      "-DDCHAG_ENABLE_MPI=${DCHAG_ENABLE_MPI}")
else()
  message(FATAL_ERROR "MODE must be install or subdirectory, not '${MODE}'")
endif()

set(build_args --build "${build}")
if(BUILD_TYPE)
  list(APPEND build_args --config "${BUILD_TYPE}")
endif()
run("${CMAKE_COMMAND}" ${build_args})

set(exe "${build}/dchag_consumer")
if(NOT EXISTS "${exe}")
  set(exe "${build}/${BUILD_TYPE}/dchag_consumer")  # multi-configuration generators
endif()
run("${exe}")
if(NOT out MATCHES "dchag consumer: ok")
  message(FATAL_ERROR "dchag_consumer did not report success")
endif()
