# cmake -DDCHAG_CMAKE_DIR=<repo>/cmake -DWORK_DIR=<scratch> [-DREAL_KOKKOSKERNELS_DIR=<dir>]
#       -P check_kokkos_repair.cmake
#
# Runs dchag_repair_kokkos() against small fake Kokkos / Kokkos Kernels packages that imitate
# the layouts it must handle, and checks that it repairs the broken one, leaves the correct one
# alone and refuses mismatched pairs. Configure only: no compiler runs.
cmake_minimum_required(VERSION 3.16)
set(probe_dir "${CMAKE_CURRENT_LIST_DIR}/repair_probe")
file(REMOVE_RECURSE "${WORK_DIR}")

function(write_version_file dir version)
  string(REGEX MATCH "^[0-9]+" major "${version}")
  file(WRITE "${dir}/KokkosConfigVersion.cmake" "set(PACKAGE_VERSION \"${version}\")
# SameMajorVersion, as Kokkos 4.0-4.x installs it
if(PACKAGE_FIND_VERSION AND NOT PACKAGE_FIND_VERSION_MAJOR EQUAL ${major})
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
endif()
")
endfunction()

function(kokkos_version_header file version)
  string(REGEX REPLACE "^([0-9]+)\\.([0-9]+)\\.([0-9]+)$" "\\1 \\2 \\3" parts "${version}")
  separate_arguments(parts)
  list(GET parts 0 major)
  list(GET parts 1 minor)
  list(GET parts 2 patch)
  math(EXPR number "${major} * 10000 + ${minor} * 100 + ${patch}")
  file(WRITE "${file}" "#define KOKKOS_VERSION ${number}\n")
endfunction()

# A CMake-built Kokkos (4.x layout): include directory on Kokkos::kokkoscore, not Kokkos::kokkos.
function(fake_kokkos prefix version)
  file(WRITE "${prefix}/include/Kokkos_Core.hpp" "")
  kokkos_version_header("${prefix}/include/KokkosCore_config.h" ${version})
  set(dir "${prefix}/lib/cmake/Kokkos")
  file(WRITE "${dir}/KokkosConfig.cmake" "add_library(Kokkos::kokkoscore INTERFACE IMPORTED)
set_target_properties(Kokkos::kokkoscore PROPERTIES INTERFACE_INCLUDE_DIRECTORIES \"${prefix}/include\")
add_library(Kokkos::kokkos INTERFACE IMPORTED)
set_target_properties(Kokkos::kokkos PROPERTIES INTERFACE_LINK_LIBRARIES Kokkos::kokkoscore)
")
  write_version_file("${dir}" ${version})
endfunction()

# A CMake-built Kokkos Kernels 4.x, recording the Kokkos it was built with.
function(fake_kernels prefix version kokkos_prefix)
  string(REPLACE "." ";" v "${version}")
  list(GET v 0 major)
  list(GET v 1 minor)
  list(GET v 2 patch)
  math(EXPR number "${major} * 10000 + ${minor} * 100 + ${patch}")
  file(WRITE "${prefix}/include/KokkosKernels_config.h" "#define KOKKOSKERNELS_VERSION ${number}\n")
  file(WRITE "${prefix}/lib/cmake/KokkosKernels/KokkosKernelsConfig.cmake"
"include(CMakeFindDependencyMacro)
if(NOT Kokkos_FOUND)
  find_dependency(Kokkos HINTS ${kokkos_prefix}/lib/cmake/Kokkos)
endif()
add_library(Kokkos::kokkoskernels INTERFACE IMPORTED)
set_target_properties(Kokkos::kokkoskernels PROPERTIES
  INTERFACE_INCLUDE_DIRECTORIES \"${prefix}/include\" INTERFACE_LINK_LIBRARIES Kokkos::kokkos)
")
endfunction()

# Debian 12's Trilinos 13.2 layout: headers in include/trilinos, Kokkos::kokkos pointing at
# include, "-DKOKKOS_DEPENDENCE" among its link items, Kernels exporting trilinos_kokkoskernels.
function(fake_tribits prefix version)
  set(inc "${prefix}/include/trilinos")
  file(WRITE "${inc}/Kokkos_Core.hpp" "")
  file(WRITE "${inc}/KokkosKernels_config.h" "#define KOKKOSKERNELS_INST_DOUBLE\n")
  kokkos_version_header("${inc}/KokkosCore_config.h" ${version})
  set(dir "${prefix}/lib/cmake/Kokkos")
  file(WRITE "${dir}/KokkosConfig.cmake" "set(Kokkos_INCLUDE_DIRS \"${inc}\")
add_library(Kokkos::kokkos INTERFACE IMPORTED)
set_target_properties(Kokkos::kokkos PROPERTIES
  INTERFACE_LINK_LIBRARIES \"trilinos_kokkoscore;-DKOKKOS_DEPENDENCE\"
  INTERFACE_INCLUDE_DIRECTORIES \"${prefix}/include\")
")
  write_version_file("${dir}" ${version})
  file(WRITE "${prefix}/lib/cmake/KokkosKernels/KokkosKernelsConfig.cmake"
"set(KokkosKernels_INCLUDE_DIRS \"${inc}\")
add_library(trilinos_kokkoskernels INTERFACE IMPORTED)
")
endfunction()

# probe(<name> <Kokkos_DIR> <KokkosKernels_DIR> PASS|FAIL <regex>...): every regex must match.
function(probe name kokkos_dir kernels_dir expect)
  execute_process(
    COMMAND "${CMAKE_COMMAND}" -S "${probe_dir}" -B "${WORK_DIR}/probe_${name}"
            "-DDCHAG_CMAKE_DIR=${DCHAG_CMAKE_DIR}" "-DKokkos_DIR=${kokkos_dir}"
            "-DKokkosKernels_DIR=${kernels_dir}" -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  set(ok TRUE)
  if(expect STREQUAL "PASS" AND NOT rc EQUAL 0)
    set(ok FALSE)
  elseif(expect STREQUAL "FAIL" AND rc EQUAL 0)
    set(ok FALSE)
  endif()
  # CMake wraps long error messages; match those with the line breaks taken out.
  string(REGEX REPLACE "[ \t\r\n]+" " " flat "${out}")
  foreach(regex IN LISTS ARGN)
    if(NOT out MATCHES "${regex}" AND NOT flat MATCHES "${regex}")
      set(ok FALSE)
      message("${name}: output does not match '${regex}'")
    endif()
  endforeach()
  if(NOT ok)
    message(FATAL_ERROR "${name}: expected ${expect}, configure returned ${rc}:\n${out}")
  endif()
  message(STATUS "${name}: ${expect} as expected")
  set(out "${out}" PARENT_SCOPE)
endfunction()

set(k45 "${WORK_DIR}/kokkos-4.5.1")
set(k43 "${WORK_DIR}/kokkos-4.3.0")
set(k33 "${WORK_DIR}/kokkos-3.3.0")
set(kk45 "${WORK_DIR}/kernels-4.5.1")
set(kk43 "${WORK_DIR}/kernels-4.3.0")
set(tri "${WORK_DIR}/trilinos")
fake_kokkos("${k45}" 4.5.1)
fake_kokkos("${k43}" 4.3.0)
fake_kokkos("${k33}" 3.3.0)
fake_kernels("${kk45}" 4.5.1 "${k45}")
fake_kernels("${kk43}" 4.3.0 "${k43}")
fake_tribits("${tri}" 3.4.1)

# A correct install passes through untouched.
probe(correct "${k45}/lib/cmake/Kokkos" "${kk45}/lib/cmake/KokkosKernels" PASS
      "probe: version=4.5.1" "probe: before=before-NOTFOUND\n" "probe: after=after-NOTFOUND\n"
      "probe: links=Kokkos::kokkoscore\n" "probe: kernels=Kokkos::kokkos\n")
if(out MATCHES "dchag: (repaired|created)")
  message(FATAL_ERROR "correct: the repair touched a correct install:\n${out}")
endif()

# The Debian layout is repaired.
probe(tribits "${tri}/lib/cmake/Kokkos" "${tri}/lib/cmake/KokkosKernels" PASS
      "probe: version=3.4.1" "probe: after=[^\n]*/trilinos/include/trilinos\n"
      "probe: links=trilinos_kokkoscore\n" "probe: kernels=trilinos_kokkoskernels;Kokkos::kokkos\n"
      "dchag: repaired Kokkos::kokkos" "dchag: created Kokkos::kokkoskernels")

# Mismatched pairs and old versions are refused with a way out.
probe(tribits_kernels_new_kokkos "${k45}/lib/cmake/Kokkos" "${tri}/lib/cmake/KokkosKernels" FAIL
      "come with Kokkos 3.4.1" "-DKokkosKernels_ROOT=")
probe(kernels_of_other_kokkos "${k45}/lib/cmake/Kokkos" "${kk43}/lib/cmake/KokkosKernels" FAIL
      "built with Kokkos 4.3.0" "-DKokkosKernels_ROOT=")
probe(kernels_major "${tri}/lib/cmake/Kokkos" "${kk45}/lib/cmake/KokkosKernels" FAIL
      "-DKokkosKernels_ROOT=")
probe(old_kokkos "${k33}/lib/cmake/Kokkos" "${kk43}/lib/cmake/KokkosKernels" FAIL
      "needs Kokkos 3.4 or newer")

# The system's own Kokkos Kernels beside a user's Kokkos 4, when the system's is a Kokkos 3 one.
if(REAL_KOKKOSKERNELS_DIR AND REAL_KOKKOS_VERSION MATCHES "^3\\.")
  probe(system_kernels_new_kokkos "${k45}/lib/cmake/Kokkos" "${REAL_KOKKOSKERNELS_DIR}" FAIL
        "-DKokkosKernels_ROOT=")
endif()
