# Install the headers and export moca::moca (and moca::cuda when built) for find_package(moca).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/moca DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
set(_moca_export_targets moca_headers)
if(MOCA_WITH_CUDA)
  list(APPEND _moca_export_targets ${MOCA_CUDA_EXPORT_TARGETS})
endif()
install(TARGETS ${_moca_export_targets} EXPORT mocaTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT mocaTargets NAMESPACE moca:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moca)

set(MOCA_CONFIG_WITH_CUDA ${MOCA_WITH_CUDA})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/mocaConfig.cmake.in
  ${PROJECT_BINARY_DIR}/mocaConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moca)
# Header-only: any architecture may use the same headers.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/mocaConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/mocaConfig.cmake ${PROJECT_BINARY_DIR}/mocaConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/moca)
