# Installs the built project into a scratch prefix, then configures, builds and runs a separate
# CMake project that uses it through find_package(omnimoe) (the README example).
file(REMOVE_RECURSE ${WORK_DIR})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/install/consumer
                        -B ${WORK_DIR}/consumer -G ${GENERATOR}
                        -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
                        -DEXAMPLE_SOURCE=${SOURCE_DIR}/examples/quickstart.cpp
                RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "configuring the find_package(omnimoe) consumer failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${WORK_DIR}/consumer RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "building the consumer failed (${rc})")
endif()
execute_process(COMMAND ${WORK_DIR}/consumer/quickstart RESULT_VARIABLE rc)
if(rc)
  message(FATAL_ERROR "the README example (examples/quickstart.cpp) failed (${rc})")
endif()
