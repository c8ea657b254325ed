// libFuzzer target: the `colt5` program's command line (app/program/cli.cpp)
// in check-only mode — every flag parsed and every setting checked, nothing
// run and no file read. The input is the argument list, one argument per
// line. Any command line must give exit status 0 (accepted), 2 (a usage
// error) or CLI11's own statuses for --help and parse errors; a crash, an
// escaping exception or undefined behaviour is a bug.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "program/commands.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args{"colt5"};
  std::string cur;
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == '\n') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(data[i]));
    }
  }
  if (!cur.empty()) args.push_back(cur);
  if (args.size() > 64) return 0;
  std::vector<const char*> argv;
  for (const auto& a : args) argv.push_back(a.c_str());
  const int status = colt5::app::run_cli(static_cast<int>(argv.size()), argv.data(),
                                         [](const std::string&) { return 0; }, /*check_only=*/true);
  // 0: accepted; 2: UsageError; CLI11's exit codes for parse errors are small positive numbers.
  if (status < 0 || status > 255) std::abort();
  return 0;
}
