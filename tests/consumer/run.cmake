# ctest consumer_find_package: installs the built project into a scratch prefix, then
# configures, builds and runs tests/consumer against it, as an outside project would.
#   cmake -DMAMBA_BUILD_DIR=... -DCONSUMER_SOURCE_DIR=... -DWORK_DIR=... -DCXX_COMPILER=...
#         [-DBUILD_TYPE=Release] [-DWERROR=ON] -P run.cmake
foreach(var MAMBA_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR CXX_COMPILER)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run.cmake: ${var} is not set")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(prefix ${WORK_DIR}/prefix)
set(build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(step name)
  string(REPLACE ";" " " shown "${ARGN}")
  message(STATUS "consumer test: ${name}: ${shown}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${name} failed (${rc})")
  endif()
endfunction()

step(install ${CMAKE_COMMAND} --install ${MAMBA_BUILD_DIR} --prefix ${prefix} --config ${BUILD_TYPE})
# Only the scratch prefix is searched for the package (no system or user package registry).
step(configure ${CMAKE_COMMAND} -S ${CONSUMER_SOURCE_DIR} -B ${build}
  -DCMAKE_BUILD_TYPE=${BUILD_TYPE} -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCONSUMER_WERROR=${WERROR})
# The package must come from the scratch prefix, not from anywhere else on the machine.
file(STRINGS ${build}/CMakeCache.txt mamba_dir_line REGEX "^mamba_DIR:")
string(FIND "${mamba_dir_line}" "${prefix}/" at)
if(NOT at GREATER -1)
  message(FATAL_ERROR "consumer test: found the package elsewhere: ${mamba_dir_line}")
endif()
step(build ${CMAKE_COMMAND} --build ${build} --config ${BUILD_TYPE})
if(EXISTS ${build}/${BUILD_TYPE}/consumer${CMAKE_EXECUTABLE_SUFFIX})
  set(exe ${build}/${BUILD_TYPE}/consumer${CMAKE_EXECUTABLE_SUFFIX})  # multi-config generators
else()
  set(exe ${build}/consumer${CMAKE_EXECUTABLE_SUFFIX})
endif()
step(run ${exe})
