# Config file for C++ programs that link the lispetorch core library installed with the Python package.
#   find_package(Torch REQUIRED)  # first
#   find_package(lispetorch REQUIRED)   # CMAKE_PREFIX_PATH from `python -m lispetorch.cmake_prefix_path`
#   target_link_libraries(app PRIVATE lispetorch::lispetorch)
get_filename_component(_lispetorch_root "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET lispetorch::lispetorch)
  add_library(lispetorch::lispetorch SHARED IMPORTED)
  set_target_properties(lispetorch::lispetorch PROPERTIES
    IMPORTED_LOCATION "${_lispetorch_root}/lib/liblispetorch.so"
    INTERFACE_INCLUDE_DIRECTORIES "${_lispetorch_root}/include"
    INTERFACE_LINK_LIBRARIES "${TORCH_LIBRARIES}")
endif()
set(lispetorch_FOUND TRUE)
