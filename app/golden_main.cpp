// colt5-golden DIR: checks every reference parity case (*.safetensors) in DIR.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "support/golden.h"

static int usage(FILE* f) {
  std::fprintf(f,
               "usage: colt5-golden DIR [--tolerance X]\n"
               "Runs every *.safetensors parity case in DIR and prints one line per case\n"
               "(PASS, FAIL or SKIP, the case name, the worst relative error), then a summary.\n"
               "Exit status: 0 when nothing failed, 1 when a case failed, 2 on bad usage.\n");
  return f == stdout ? 0 : 2;
}

int main(int argc, char** argv) {
  std::string dir;
  double tolerance = 1e-7;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "-h" || a == "--help") return usage(stdout);
    if (a == "--tolerance") {
      char* end = nullptr;
      if (i + 1 >= argc || (tolerance = std::strtod(argv[i + 1], &end), *end != '\0') || !(tolerance >= 0)) {
        std::fprintf(stderr, "colt5-golden: --tolerance needs a non-negative number\n");
        return 2;
      }
      ++i;
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "colt5-golden: unknown option %s\n", a.c_str());
      return usage(stderr);
    } else if (dir.empty()) {
      dir = a;
    } else {
      std::fprintf(stderr, "colt5-golden: more than one directory given\n");
      return usage(stderr);
    }
  }
  if (dir.empty()) return usage(stderr);
  return colt5::golden::main_for_dir(dir, tolerance);
}
