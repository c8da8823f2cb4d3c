# Helpers for dchag's own tests, benchmarks and examples. Not installed.
#
#   dchag_enable_warnings(<target>)
#     -Wall -Wextra -Wpedantic on <target> (PRIVATE; never on the library target).
#
#   dchag_add_test(NAME <name> SOURCES <file>... [RANKS <n>...] [TIMEOUT <seconds>]
#                  [LABELS <label>...])
#     Builds executable <name> from SOURCES and the shared Catch2 main (tests/main.cpp), linked to
#     dchag::dchag. Without RANKS it registers the ctest test <name>. With RANKS and
#     DCHAG_ENABLE_MPI it registers <name>_np<k> for every k, run as
#       mpiexec -n <k> [--oversubscribe] <name>
#     (with MPI off, RANKS is ignored and <name> runs once, without mpiexec). TIMEOUT defaults to
#     300 seconds. Tests carry the label "mpi" (with RANKS) or "serial", plus LABELS.
include_guard(GLOBAL)

function(dchag_enable_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<CXX_COMPILER_ID:GNU,Clang,AppleClang,IntelLLVM>:-Wall -Wextra -Wpedantic>)
endfunction()

# Executables that measure speed: vector instructions of this CPU (the kernels' inner loops are
# written to vectorize; without this only the baseline ISA is used).
function(dchag_enable_native_arch target)
  if(DCHAG_ENABLE_NATIVE_ARCH)
    target_compile_options(${target} PRIVATE $<$<CXX_COMPILER_ID:GNU,Clang,IntelLLVM>:-march=native>)
  endif()
endfunction()

# Running as root inside containers is the common case on CI; Open MPI refuses it unless told.
set(DCHAG_TEST_ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
# Sanitized builds (preset debug-sanitize). mpiexec passes the environment on to the ranks.
set(_dchag_flags "${CMAKE_CXX_FLAGS} ${CMAKE_EXE_LINKER_FLAGS}")
if(_dchag_flags MATCHES "-fsanitize=[^ ]*address")
  # allocator_may_return_null: an impossible allocation fails as it does without ASan (Kokkos
  # throws), so the tests of dchag's allocation-failure errors run instead of aborting.
  set(_dchag_asan "allocator_may_return_null=1")
  if(DCHAG_ENABLE_MPI)
    # Open MPI leaks at MPI_Init, which every test main calls, so LeakSanitizer would fail every
    # test on memory that is none of dchag's. Only leak checking is off; ASan finds everything
    # else.
    string(APPEND _dchag_asan ":detect_leaks=0")
  endif()
  list(APPEND DCHAG_TEST_ENVIRONMENT "ASAN_OPTIONS=${_dchag_asan}")
  unset(_dchag_asan)
endif()
if(_dchag_flags MATCHES "-fsanitize=[^ ]*undefined")
  # A UBSan finding with a stack, not just the line of the check.
  list(APPEND DCHAG_TEST_ENVIRONMENT "UBSAN_OPTIONS=print_stacktrace=1")
endif()
unset(_dchag_flags)

if(DCHAG_ENABLE_MPI AND NOT DEFINED DCHAG_MPIEXEC_OVERSUBSCRIBE)
  # Open MPI refuses more ranks than cores unless told; MPICH has no such flag and needs none.
  set(_dchag_flag "")
  if(MPIEXEC_EXECUTABLE)
    execute_process(COMMAND "${MPIEXEC_EXECUTABLE}" --version
                    OUTPUT_VARIABLE _dchag_out ERROR_VARIABLE _dchag_out TIMEOUT 20)
    if(_dchag_out MATCHES "Open MPI|OpenRTE")
      set(_dchag_flag "--oversubscribe")
    endif()
  endif()
  set(DCHAG_MPIEXEC_OVERSUBSCRIBE "${_dchag_flag}" CACHE STRING
      "Flag that lets mpiexec start more ranks than cores (--oversubscribe for Open MPI)")
  unset(_dchag_flag)
  unset(_dchag_out)
endif()

function(dchag_add_test)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "NAME;TIMEOUT" "SOURCES;RANKS;LABELS")
  if(arg_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "dchag_add_test: unknown arguments: ${arg_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT arg_NAME OR NOT arg_SOURCES)
    message(FATAL_ERROR "dchag_add_test: NAME and SOURCES are required")
  endif()
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 300)
  endif()
  if(NOT TARGET dchag_test_main)
    message(FATAL_ERROR "dchag_add_test: the target dchag_test_main (tests/main.cpp) is missing")
  endif()

  set(labels "")
  if(arg_LABELS)
    set(labels ";${arg_LABELS}")
  endif()

  add_executable(${arg_NAME} ${arg_SOURCES})
  target_link_libraries(${arg_NAME} PRIVATE dchag_test_main)
  dchag_enable_warnings(${arg_NAME})

  if(arg_RANKS AND DCHAG_ENABLE_MPI)
    foreach(np IN LISTS arg_RANKS)
      set(test ${arg_NAME}_np${np})
      add_test(NAME ${test}
               COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${np}
                       ${DCHAG_MPIEXEC_OVERSUBSCRIBE} ${MPIEXEC_PREFLAGS}
                       $<TARGET_FILE:${arg_NAME}> ${MPIEXEC_POSTFLAGS}
                       # Open MPI gives ranks a terminal; keep escape codes out of ctest logs.
                       --use-colour no)
      set_tests_properties(${test} PROPERTIES
        TIMEOUT ${arg_TIMEOUT}
        PROCESSORS ${np}
        LABELS "mpi${labels}"
        ENVIRONMENT "${DCHAG_TEST_ENVIRONMENT}")
    endforeach()
  else()
    add_test(NAME ${arg_NAME} COMMAND ${arg_NAME})
    set_tests_properties(${arg_NAME} PROPERTIES
      TIMEOUT ${arg_TIMEOUT}
      LABELS "serial${labels}"
      ENVIRONMENT "${DCHAG_TEST_ENVIRONMENT}")
  endif()
endfunction()
