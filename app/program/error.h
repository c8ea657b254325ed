// The error for anything the user asked for (or a file holds) that cannot work.
#pragma once

#include <stdexcept>

namespace colt5 {
namespace app {

// The program prints the message and exits with status 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace app
}  // namespace colt5
