# Multi-rank tests: real mpirun, CPU ranks over the MPI transport, one OpenMP thread a rank. They
# run one at a time (RESOURCE_LOCK): the ranks already oversubscribe the cores.
find_package(MPI REQUIRED COMPONENTS C)
add_executable(test_distributed ${CMAKE_CURRENT_LIST_DIR}/test_distributed.cc)
target_link_libraries(test_distributed PRIVATE mamba_worker GTest::gtest)
target_include_directories(test_distributed PRIVATE ${PROJECT_SOURCE_DIR})

set(MAMBA_MPIRUN ${MPIEXEC_EXECUTABLE} --oversubscribe --allow-run-as-root --bind-to none
    -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=PASSIVE)
string(JOIN " " MAMBA_MPIRUN_SH ${MAMBA_MPIRUN})  # for sh -c command lines
foreach(np 2 4 8)
  add_test(NAME mpi.np${np}.distributed
           COMMAND ${MAMBA_MPIRUN} -np ${np} $<TARGET_FILE:test_distributed>)
  set_tests_properties(mpi.np${np}.distributed PROPERTIES TIMEOUT 600 RESOURCE_LOCK mpi
                       ENVIRONMENT "OMP_NUM_THREADS=1")
endforeach()

# The worker binary under mpirun: a grid that does not fit is refused before any work; a dp x sp
# job trains; a rank killed or stopped mid-job ends the job within a bound, naming the rank.
add_test(NAME mpi.np3.layout_is_refused
         COMMAND sh -c "printf '{\"data\":{\"inductionHeads\":{}},\"parallel\":{\"dp\":2,\"sp\":2}}' > bad-layout.json && ! ${MAMBA_MPIRUN_SH} -np 3 $<TARGET_FILE:mamba-worker> --job bad-layout.json"
         WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
set_tests_properties(mpi.np3.layout_is_refused PROPERTIES TIMEOUT 120 RESOURCE_LOCK mpi
  PASS_REGULAR_EXPRESSION "parallel: dp x sp \\(2 x 2 = 4\\) must equal the number of ranks \\(3\\)")
add_test(NAME mpi.np4.trains_dp2_sp2
         COMMAND ${MAMBA_MPIRUN} -np 4 $<TARGET_FILE:mamba-worker>
                 --job ${CMAKE_CURRENT_SOURCE_DIR}/jobs/tiny-induction-dp2-sp2.json
                 --summary_json dp2-sp2-summary.json
         WORKING_DIRECTORY ${CMAKE_CURRENT_BINARY_DIR})
set_tests_properties(mpi.np4.trains_dp2_sp2 PROPERTIES TIMEOUT 300 RESOURCE_LOCK mpi
  PASS_REGULAR_EXPRESSION "ranks: 4 \\(dp 2 x sp 2 over mpi\\).*done: 20 steps")
foreach(mode kill stop)
  add_test(NAME mpi.np2.rank_${mode}_mid_job
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/rank_failure.sh ${MAMBA_MPIRUN} -- $<TARGET_FILE:mamba-worker> ${mode})
  set_tests_properties(mpi.np2.rank_${mode}_mid_job PROPERTIES TIMEOUT 180 RESOURCE_LOCK mpi
                       PASS_REGULAR_EXPRESSION "PASS")
endforeach()
