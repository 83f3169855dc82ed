# libFuzzer harnesses (ASan + UBSan) for every parser that reads outside data, built with clang
# when it can make fuzzer binaries (the rest of the project is built by the default compiler; the
# harnesses compile their parsers' sources themselves). ctest runs each for a few seconds on a
# copy of its seed corpus (tests/fuzz/corpus/<name>); scripts/fuzz.sh runs them longer.
find_program(MAMBA_CLANGXX NAMES clang++ clang++-14)
set(MAMBA_FUZZ OFF)
if(MAMBA_CLANGXX)
  set(probe ${CMAKE_BINARY_DIR}/fuzz_probe.cc)
  file(WRITE ${probe} "extern \"C\" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }\n")
  execute_process(COMMAND ${MAMBA_CLANGXX} -fsanitize=fuzzer,address,undefined ${probe}
                          -o ${CMAKE_BINARY_DIR}/fuzz_probe
                  RESULT_VARIABLE probe_rc OUTPUT_QUIET ERROR_QUIET)
  if(probe_rc EQUAL 0)
    set(MAMBA_FUZZ ON)
  endif()
endif()
message(STATUS "fuzz targets (clang libFuzzer): ${MAMBA_FUZZ}")
if(NOT MAMBA_FUZZ)
  return()
endif()

find_package(PkgConfig REQUIRED)
pkg_check_modules(MAMBA_FUZZ_LIBS REQUIRED absl_status absl_statusor absl_strings absl_str_format
                  protobuf grpc++ sqlite3)
set(src ${PROJECT_SOURCE_DIR})
set(gen ${CMAKE_BINARY_DIR}/proto)
set(fuzz_common ${src}/worker/tensor.cc ${src}/checkpoints/json_reader.cc)
set(fuzz_safetensors_sources ${src}/checkpoints/safetensors.cc ${src}/checkpoints/durable_io.cc)
set(fuzz_hf_config_sources ${src}/checkpoints/hf_config.cc ${src}/checkpoints/durable_io.cc)
set(fuzz_trainer_state_sources ${src}/checkpoints/trainer_state.cc)
set(fuzz_job_spec_sources ${src}/worker/job_spec.cc ${src}/profiling/step_model.cc
    ${src}/profiling/traffic_model.cc ${src}/coordinator/job_service.cc
    ${src}/coordinator/job_store.cc ${src}/checkpoints/durable_io.cc ${gen}/job.pb.cc ${gen}/service.pb.cc
    ${gen}/service.grpc.pb.cc)
file(GLOB data_sources ${src}/worker/data/*.cc)
set(fuzz_token_file_sources ${data_sources} ${gen}/job.pb.cc)

file(MAKE_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/fuzz)
foreach(name safetensors hf_config trainer_state job_spec token_file)
  set(bin ${CMAKE_CURRENT_BINARY_DIR}/fuzz/fuzz_${name})
  add_custom_command(
    OUTPUT ${bin}
    COMMAND ${MAMBA_CLANGXX} -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined
            -fno-sanitize-recover=undefined -I${src} -I${CMAKE_BINARY_DIR} -I${gen}
            ${CMAKE_CURRENT_LIST_DIR}/fuzz_${name}.cc ${fuzz_${name}_sources} ${fuzz_common}
            ${MAMBA_FUZZ_LIBS_LDFLAGS} -o ${bin}
    DEPENDS ${CMAKE_CURRENT_LIST_DIR}/fuzz_${name}.cc ${fuzz_${name}_sources} ${fuzz_common}
    COMMENT "fuzz target fuzz_${name} (clang, libFuzzer, ASan + UBSan)"
    VERBATIM)
  add_custom_target(fuzz_${name}_target ALL DEPENDS ${bin})
  add_dependencies(fuzz_${name}_target mamba_service_proto)
  add_test(NAME fuzz.${name}
           COMMAND sh -c "rm -rf corpus-${name} && cp -r ${CMAKE_CURRENT_LIST_DIR}/corpus/${name} corpus-${name} && ${bin} -max_total_time=5 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 corpus-${name}"
           WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR}/fuzz)
  set_tests_properties(fuzz.${name} PROPERTIES TIMEOUT 120)
endforeach()
