// The `colt5` program: train, eval, sample, bench, golden (app/program/ holds its code).
#include <cstdlib>
#include <string>

#include <unistd.h>

#include "support/golden.h"
#include "program/commands.h"

int main(int argc, char** argv) {
  // LibTorch's OpenMP threads spin while waiting for work by default. On a
  // machine whose cores are also busy with other processes, spinning threads
  // take the cores from each other and training runs several times slower.
  // The wait policy is read once when the OpenMP runtime loads, so it is set
  // here and the program starts itself again; OMP_WAIT_POLICY=active restores
  // spinning.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr && ::setenv("OMP_WAIT_POLICY", "passive", 1) == 0)
    ::execv("/proc/self/exe", argv);
  return colt5::app::run_cli(argc, argv, [](const std::string& dir) { return colt5::golden::main_for_dir(dir); });
}
