# Writes OUT, a header defining OMNIMOE_GIT_COMMIT: OVERRIDE when given, else the checkout's
# short HEAD with "+dirty" when tracked files differ from it, else "" (no git). Run at every
# build (script mode), rewriting OUT only when the text changes, so the benchmark JSON names the
# commit its binary was built from without recompiling anything when nothing moved.
if(OVERRIDE)
  set(id "${OVERRIDE}")
else()
  execute_process(COMMAND git rev-parse --short=12 HEAD WORKING_DIRECTORY "${SOURCE_DIR}"
                  OUTPUT_VARIABLE id OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET
                  RESULT_VARIABLE rc)
  if(rc)
    set(id "")
  else()
    execute_process(COMMAND git status --porcelain --untracked-files=no
                    WORKING_DIRECTORY "${SOURCE_DIR}" OUTPUT_VARIABLE changes ERROR_QUIET)
    if(changes)
      string(APPEND id "+dirty")
    endif()
  endif()
endif()
set(text "#define OMNIMOE_GIT_COMMIT \"${id}\"\n")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
endif()
if(NOT "${old}" STREQUAL "${text}")
  file(WRITE "${OUT}" "${text}")
endif()
