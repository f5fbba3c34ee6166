# The Python module mambacpp (included from the top-level CMakeLists.txt).
#
# MAMBA_PYTHON = AUTO | ON | OFF. The module is the package python/mambacpp/ (pure Python) plus
# the extension mambacpp._core (python/src/, pybind11). At the ABI level it depends on Python and
# numpy only: it never links libtorch, and mambacpp.torch is pure Python over the numpy API, so
# one build works with whatever torch the user has.
#
# The build puts a complete, importable package in <build>/python/mambacpp/ (the .py files are
# copied there, the extension is built there): PYTHONPATH=<build>/python. The pytest suite
# (python/tests) runs from ctest with that path, and the test python_venv_install checks the
# one-command install (pip install --no-build-isolation .) into a fresh venv, reusing this build.

if(NOT MAMBA_PYTHON MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MAMBA_PYTHON must be AUTO, ON or OFF, got '${MAMBA_PYTHON}'")
endif()
if(MAMBA_PYTHON STREQUAL "OFF")
  message(STATUS "mamba.cpp Python module: off (MAMBA_PYTHON=OFF)")
  return()
endif()
# A sanitizer build's module cannot be loaded by an uninstrumented python (the ASan runtime must
# come first): AUTO skips it there, so sanitizer CI stages run the C++ tests only.
if(MAMBA_SANITIZE)
  if(MAMBA_PYTHON STREQUAL "ON")
    message(FATAL_ERROR "MAMBA_PYTHON=ON with MAMBA_SANITIZE=${MAMBA_SANITIZE}: the module would not load into python; use AUTO or OFF")
  endif()
  message(STATUS "mamba.cpp Python module: skipped in a sanitizer build (MAMBA_SANITIZE=${MAMBA_SANITIZE})")
  return()
endif()

# The interpreter: Python3_EXECUTABLE when given (setup.py passes sys.executable); otherwise the
# first of `python3` on PATH and /usr/bin/python3 that imports numpy (a pyenv or conda python
# first on PATH without numpy would otherwise win, and the tests would run where nothing is
# installed).
if(NOT Python3_EXECUTABLE)
  find_program(MAMBA_PATH_PYTHON3 NAMES python3)
  foreach(cand ${MAMBA_PATH_PYTHON3} /usr/bin/python3)
    if(EXISTS "${cand}")
      execute_process(COMMAND "${cand}" -c "import numpy" RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
      if(rc EQUAL 0)
        set(Python3_EXECUTABLE "${cand}" CACHE FILEPATH "Python for the mambacpp module")
        break()
      endif()
    endif()
  endforeach()
endif()

set(mamba_py_missing "")
if(MAMBA_PYTHON STREQUAL "ON")
  find_package(Python3 COMPONENTS Interpreter Development.Module REQUIRED)
  find_package(pybind11 CONFIG REQUIRED)
else()
  find_package(Python3 COMPONENTS Interpreter Development.Module)
  if(Python3_FOUND)
    find_package(pybind11 CONFIG QUIET)
  endif()
  if(NOT Python3_FOUND)
    set(mamba_py_missing "Python 3 with its development headers (python3-dev)")
  elseif(NOT pybind11_FOUND)
    set(mamba_py_missing "pybind11 (pybind11-dev)")
  endif()
endif()
if(Python3_FOUND)
  execute_process(COMMAND "${Python3_EXECUTABLE}" -c "import numpy" RESULT_VARIABLE mamba_py_np
    OUTPUT_QUIET ERROR_QUIET)
  if(NOT mamba_py_np EQUAL 0)
    if(MAMBA_PYTHON STREQUAL "ON")
      message(FATAL_ERROR "MAMBA_PYTHON=ON: ${Python3_EXECUTABLE} cannot import numpy (python3-numpy)")
    endif()
    set(mamba_py_missing "numpy for ${Python3_EXECUTABLE} (python3-numpy)")
  endif()
endif()
if(mamba_py_missing)
  message(STATUS "mamba.cpp Python module: skipped, ${mamba_py_missing} not found (MAMBA_PYTHON=AUTO)")
  return()
endif()
message(STATUS "mamba.cpp Python module: ${Python3_EXECUTABLE} (Python ${Python3_VERSION}), pybind11 ${pybind11_VERSION}")

set(MAMBA_PY_PACKAGE_DIR ${PROJECT_BINARY_DIR}/python/mambacpp)
file(GLOB MAMBA_PY_EXT_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/python/src/*.cpp)
# NO_EXTRAS: no link-time optimisation of the binding glue (the kernels are in libmamba, compiled
# as usual, and the glue is not hot): its LTO link, serial LTRANS jobs, lengthened CI's build.
pybind11_add_module(_core MODULE NO_EXTRAS ${MAMBA_PY_EXT_SOURCES})
target_link_libraries(_core PRIVATE mamba nlohmann_json::nlohmann_json)
target_include_directories(_core PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/python/src)
target_compile_definitions(_core PRIVATE MAMBACPP_VERSION="${PROJECT_VERSION}")
set_target_properties(_core PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${MAMBA_PY_PACKAGE_DIR}
  INSTALL_RPATH_USE_LINK_PATH ON BUILD_RPATH_USE_ORIGIN OFF)

# The pure-Python files next to the extension (copied whenever one changes).
file(GLOB MAMBA_PY_FILES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/python/mambacpp/*.py)
set(mamba_py_copied "")
foreach(f ${MAMBA_PY_FILES})
  get_filename_component(n ${f} NAME)
  add_custom_command(OUTPUT ${MAMBA_PY_PACKAGE_DIR}/${n}
    COMMAND ${CMAKE_COMMAND} -E copy_if_different ${f} ${MAMBA_PY_PACKAGE_DIR}/${n}
    DEPENDS ${f} VERBATIM)
  list(APPEND mamba_py_copied ${MAMBA_PY_PACKAGE_DIR}/${n})
endforeach()
add_custom_target(mambacpp_python ALL DEPENDS ${mamba_py_copied} _core)

if(MAMBA_BUILD_TESTS)
  enable_testing()
  execute_process(COMMAND "${Python3_EXECUTABLE}" -c "import pytest" RESULT_VARIABLE mamba_py_pytest
    OUTPUT_QUIET ERROR_QUIET)
  if(mamba_py_pytest EQUAL 0)
    # One ctest per test file, so that ctest -j spreads them over the cores.
    file(GLOB MAMBA_PY_TESTS CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/python/tests/test_*.py)
    foreach(t ${MAMBA_PY_TESTS})
      get_filename_component(n ${t} NAME_WE)
      add_test(NAME python_${n}
        COMMAND "${Python3_EXECUTABLE}" -m pytest -q -p no:cacheprovider ${t}
        WORKING_DIRECTORY ${PROJECT_SOURCE_DIR})
      set_tests_properties(python_${n} PROPERTIES TIMEOUT 600 ENVIRONMENT
        "PYTHONPATH=${PROJECT_BINARY_DIR}/python;OMP_NUM_THREADS=2;MAMBA_TEST_DATA=${PROJECT_SOURCE_DIR}/tests/data;MAMBA_SHARED_DIR=${PROJECT_SOURCE_DIR}/../shared")
    endforeach()
    # The one-command install into a fresh venv (python3 -m venv --system-site-packages), reusing
    # this build's extension (MAMBACPP_CMAKE_BUILD_DIR), then an import from outside the tree.
    add_test(NAME python_venv_install
      COMMAND bash ${PROJECT_SOURCE_DIR}/python/tests/venv_install.sh "${Python3_EXECUTABLE}"
        ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR}
      WORKING_DIRECTORY ${PROJECT_BINARY_DIR})
    set_tests_properties(python_venv_install PROPERTIES TIMEOUT 600 ENVIRONMENT "OMP_NUM_THREADS=2")
  else()
    message(STATUS "mamba.cpp Python tests: skipped, ${Python3_EXECUTABLE} cannot import pytest (python3-pytest)")
  endif()
endif()
