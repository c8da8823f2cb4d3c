# Checks and, where needed, repairs the Kokkos and Kokkos Kernels that find_package() returned.
#
# Used by dchag's own build and by the installed dchagConfig.cmake, after
#   find_package(Kokkos) and find_package(KokkosKernels):
#
#   include(dchagKokkosRepair)
#   dchag_repair_kokkos()
#
# A correct install (Kokkos >= 3.4 with its own CMake package, Kokkos Kernels exporting
# Kokkos::kokkoskernels) passes through untouched. What it mends, all of it seen on Debian 12
# (Trilinos 13.2, i.e. Kokkos 3.4.01 built with TriBITS):
#   - Kokkos::kokkos points at <prefix>/include although the headers are in <prefix>/include/trilinos,
#     and carries "-DKOKKOS_DEPENDENCE" as a link item;
#   - Kokkos Kernels exports only the target trilinos_kokkoskernels, not Kokkos::kokkoskernels.
# What it refuses: a Kokkos Kernels built for another Kokkos than the one found (typically Debian's
# Kernels picked up beside a user's Kokkos given with -DKokkos_ROOT). That pair compiles against two
# sets of Kokkos headers and fails late and obscurely, so stop at configure time instead.
#
# Sets in the caller's scope:
#   DCHAG_KOKKOS_VERSION         version of the Kokkos headers in use (from KokkosCore_config.h)
#   DCHAG_KOKKOS_INCLUDE_DIR     directory holding Kokkos_Core.hpp, when it can be told
#   DCHAG_KOKKOSKERNELS_VERSION  version of Kokkos Kernels where its headers say it, else empty
include_guard(GLOBAL)

# Plain include directories of <target> and of every target it links, transitively. Kokkos 4 keeps
# its include directory on Kokkos::kokkoscore, not on Kokkos::kokkos, hence the walk. Sets
# <out_opaque> when an entry is a generator expression, i.e. when the directories cannot be told.
function(_dchag_interface_include_dirs target out_dirs out_opaque)
  set(dirs "")
  set(opaque FALSE)
  set(seen "")
  set(queue "${target}")
  while(queue)
    list(GET queue 0 t)
    list(REMOVE_AT queue 0)
    if(t IN_LIST seen OR NOT TARGET "${t}")
      continue()
    endif()
    list(APPEND seen "${t}")
    get_target_property(aliased "${t}" ALIASED_TARGET)
    if(aliased)
      list(APPEND queue "${aliased}")
      continue()
    endif()
    get_target_property(incs "${t}" INTERFACE_INCLUDE_DIRECTORIES)
    if(incs)
      foreach(d IN LISTS incs)
        if(d MATCHES "\\$<")
          set(opaque TRUE)
        else()
          list(APPEND dirs "${d}")
        endif()
      endforeach()
    endif()
    get_target_property(libs "${t}" INTERFACE_LINK_LIBRARIES)
    if(libs)
      foreach(l IN LISTS libs)
        if(TARGET "${l}")
          list(APPEND queue "${l}")
        endif()
      endforeach()
    endif()
  endwhile()
  list(REMOVE_DUPLICATES dirs)
  set(${out_dirs} "${dirs}" PARENT_SCOPE)
  set(${out_opaque} ${opaque} PARENT_SCOPE)
endfunction()

# First directory of <dirs> that holds <file>, as a real path; empty if none.
function(_dchag_dir_with_file file out)
  set(found "")
  foreach(d IN LISTS ARGN)
    if(d AND EXISTS "${d}/${file}")
      get_filename_component(found "${d}" REALPATH)
      break()
    endif()
  endforeach()
  set(${out} "${found}" PARENT_SCOPE)
endfunction()

# "MAJOR.MINOR.PATCH" from "#define <macro> MMmmpp" in <header>; empty if absent.
function(_dchag_version_from_header header macro out)
  set(version "")
  if(EXISTS "${header}")
    file(STRINGS "${header}" line REGEX "^#define[ \t]+${macro}[ \t]+[0-9]+")
    if(line MATCHES "${macro}[ \t]+([0-9]+)")
      set(v "${CMAKE_MATCH_1}")
      math(EXPR major "${v} / 10000")
      math(EXPR minor "${v} / 100 % 100")
      math(EXPR patch "${v} % 100")
      set(version "${major}.${minor}.${patch}")
    endif()
  endif()
  set(${out} "${version}" PARENT_SCOPE)
endfunction()

function(_dchag_fail_mismatch)
  string(CONCAT why ${ARGN})
  message(FATAL_ERROR
    "dchag: the Kokkos Kernels found at\n  ${KokkosKernels_DIR}\n"
    "does not belong to the Kokkos found at\n  ${Kokkos_DIR}\n(${why}).\n"
    "Pass -DKokkosKernels_ROOT=<install prefix of the Kokkos Kernels built for that Kokkos> "
    "(or -DKokkosKernels_DIR=<its lib/cmake/KokkosKernels>) together with -DKokkos_ROOT.")
endfunction()

function(dchag_repair_kokkos)
  set(min_version 3.4)
  if(NOT Kokkos_FOUND)
    message(FATAL_ERROR "dchag: call find_package(Kokkos) before dchag_repair_kokkos()")
  endif()
  if(NOT KokkosKernels_FOUND)
    message(FATAL_ERROR "dchag: call find_package(KokkosKernels) before dchag_repair_kokkos()")
  endif()

  if(NOT TARGET Kokkos::kokkos)
    message(FATAL_ERROR "dchag: the Kokkos package at ${Kokkos_DIR} defines no Kokkos::kokkos")
  endif()
  set(kokkos_target Kokkos::kokkos)
  get_target_property(aliased Kokkos::kokkos ALIASED_TARGET)
  if(aliased)
    set(kokkos_target "${aliased}")
  endif()

  # 1. Kokkos::kokkos must lead to Kokkos_Core.hpp.
  _dchag_interface_include_dirs(${kokkos_target} kokkos_dirs kokkos_opaque)
  _dchag_dir_with_file(Kokkos_Core.hpp kokkos_inc ${kokkos_dirs})
  if(NOT kokkos_inc AND NOT kokkos_opaque)
    # Prefixes: the TriBITS install directory, and <prefix>/lib[/<multiarch>]/cmake/Kokkos.
    get_filename_component(up3 "${Kokkos_DIR}/../../.." ABSOLUTE)
    get_filename_component(up4 "${Kokkos_DIR}/../../../.." ABSOLUTE)
    set(candidates ${DCHAG_KOKKOS_INCLUDE_DIR} ${Kokkos_INCLUDE_DIRS})
    foreach(p IN ITEMS ${Kokkos_INSTALL_DIR} "${up3}" "${up4}")
      list(APPEND candidates "${p}/include/trilinos" "${p}/include/kokkos" "${p}/include")
    endforeach()
    list(APPEND candidates /usr/include/trilinos)
    _dchag_dir_with_file(Kokkos_Core.hpp kokkos_inc ${candidates})
    if(NOT kokkos_inc)
      message(FATAL_ERROR
        "dchag: Kokkos::kokkos (from ${Kokkos_DIR}) has no include directory with Kokkos_Core.hpp "
        "and none was found near it. Pass -DDCHAG_KOKKOS_INCLUDE_DIR=<directory of Kokkos_Core.hpp>.")
    endif()
    get_target_property(libs ${kokkos_target} INTERFACE_LINK_LIBRARIES)
    if(libs)
      list(REMOVE_ITEM libs "-DKOKKOS_DEPENDENCE")
    else()
      set(libs "")
    endif()
    # Imported include directories are SYSTEM for consumers anyway; say so explicitly, since
    # dchag's tests compile with -Wall -Wextra -Wpedantic -Werror.
    set_target_properties(${kokkos_target} PROPERTIES
      INTERFACE_INCLUDE_DIRECTORIES "${kokkos_inc}"
      INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${kokkos_inc}"
      INTERFACE_LINK_LIBRARIES "${libs}")
    message(STATUS "dchag: repaired Kokkos::kokkos include directory: ${kokkos_inc}")
  endif()

  # 2. Version, from the headers: a TriBITS package version may be the Trilinos one.
  set(kokkos_version "${Kokkos_VERSION}")
  if(kokkos_inc)
    _dchag_version_from_header("${kokkos_inc}/KokkosCore_config.h" KOKKOS_VERSION header_version)
    if(header_version)
      set(kokkos_version "${header_version}")
    endif()
  endif()
  if(NOT kokkos_version)
    message(FATAL_ERROR "dchag: cannot tell the version of the Kokkos at ${Kokkos_DIR}")
  endif()
  if(kokkos_version VERSION_LESS min_version)
    message(FATAL_ERROR "dchag: needs Kokkos ${min_version} or newer; the Kokkos at "
                        "${Kokkos_DIR} is ${kokkos_version}. Pass -DKokkos_ROOT=<a newer Kokkos>.")
  endif()

  # 3. Kokkos::kokkoskernels, made from whatever target the Kernels package did export.
  if(NOT TARGET Kokkos::kokkoskernels)
    set(kernels_lib "")
    foreach(candidate IN ITEMS KokkosKernels::kokkoskernels trilinos_kokkoskernels kokkoskernels)
      if(TARGET ${candidate})
        set(kernels_lib ${candidate})
        break()
      endif()
    endforeach()
    if(NOT kernels_lib)
      message(FATAL_ERROR "dchag: the Kokkos Kernels package at ${KokkosKernels_DIR} defines none "
                          "of Kokkos::kokkoskernels, trilinos_kokkoskernels, kokkoskernels")
    endif()
    set(kernels_incs "")
    foreach(d IN LISTS KokkosKernels_INCLUDE_DIRS)
      if(EXISTS "${d}")
        get_filename_component(d "${d}" REALPATH)
        list(APPEND kernels_incs "${d}")
      endif()
    endforeach()
    add_library(Kokkos::kokkoskernels INTERFACE IMPORTED)
    set_target_properties(Kokkos::kokkoskernels PROPERTIES
      INTERFACE_LINK_LIBRARIES "${kernels_lib};Kokkos::kokkos"
      INTERFACE_INCLUDE_DIRECTORIES "${kernels_incs}"
      INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${kernels_incs}")
    message(STATUS "dchag: created Kokkos::kokkoskernels from ${kernels_lib}")
  endif()

  # 4. Kokkos Kernels must belong to this Kokkos.
  _dchag_interface_include_dirs(Kokkos::kokkoskernels kernels_dirs kernels_opaque)
  _dchag_dir_with_file(KokkosKernels_config.h kernels_inc ${kernels_dirs} ${KokkosKernels_INCLUDE_DIRS})
  set(kernels_version "")
  if(kernels_inc)
    _dchag_version_from_header("${kernels_inc}/KokkosKernels_config.h" KOKKOSKERNELS_VERSION
                               kernels_version)
  endif()
  string(REGEX MATCH "^[0-9]+" kokkos_major "${kokkos_version}")

  # 4a. Kokkos Kernels 4+ records the Kokkos it was built with in its package file.
  if(KokkosKernels_CONFIG AND EXISTS "${KokkosKernels_CONFIG}")
    file(STRINGS "${KokkosKernels_CONFIG}" dep REGEX "find_dependency\\(Kokkos[ \t]")
    if(dep MATCHES "HINTS[ \t]+\"?([^ \t\")]+)")
      get_filename_component(recorded "${CMAKE_MATCH_1}" REALPATH)
      get_filename_component(found "${Kokkos_DIR}" REALPATH)
      if(NOT recorded STREQUAL found AND EXISTS "${recorded}/KokkosConfigVersion.cmake")
        file(STRINGS "${recorded}/KokkosConfigVersion.cmake" line
             REGEX "set\\(PACKAGE_VERSION \"[^\"]*\"\\)")
        if(line MATCHES "PACKAGE_VERSION \"([^\"]*)\"" AND
           NOT CMAKE_MATCH_1 VERSION_EQUAL Kokkos_VERSION)
          _dchag_fail_mismatch("it was built with Kokkos ${CMAKE_MATCH_1} at ${recorded}, "
                               "the Kokkos found is ${Kokkos_VERSION}")
        endif()
      endif()
    endif()
  endif()

  # 4b. A TriBITS install keeps the Kernels headers beside the Kokkos headers it was built with.
  if(kernels_inc AND kokkos_inc AND EXISTS "${kernels_inc}/KokkosCore_config.h" AND
     NOT kernels_inc STREQUAL kokkos_inc)
    _dchag_version_from_header("${kernels_inc}/KokkosCore_config.h" KOKKOS_VERSION own_version)
    if(NOT own_version VERSION_EQUAL kokkos_version)
      _dchag_fail_mismatch("its headers in ${kernels_inc} come with Kokkos ${own_version}, "
                           "the Kokkos found is ${kokkos_version} in ${kokkos_inc}")
    endif()
  endif()

  # 4c. Kokkos Kernels and Kokkos share their major version.
  if(kernels_version)
    string(REGEX MATCH "^[0-9]+" kernels_major "${kernels_version}")
    if(NOT kernels_major EQUAL kokkos_major)
      _dchag_fail_mismatch("Kokkos Kernels ${kernels_version} cannot serve Kokkos ${kokkos_version}")
    endif()
  endif()

  set(DCHAG_KOKKOS_VERSION "${kokkos_version}" PARENT_SCOPE)
  set(DCHAG_KOKKOS_INCLUDE_DIR "${kokkos_inc}" PARENT_SCOPE)
  set(DCHAG_KOKKOSKERNELS_VERSION "${kernels_version}" PARENT_SCOPE)
endfunction()
