// The tests' one error-message matcher.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "support/support.h"

namespace colt5 {
namespace testing {

// A test failure unless f throws a c10::Error whose message contains needle.
inline void expect_error(const std::function<void()>& f, const std::string& needle) {
  bool threw = false;
  std::string msg;
  try {
    f();
  } catch (const c10::Error& e) {
    threw = true;
    msg = e.what_without_backtrace();
  }
  if (!threw) {
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
    return;
  }
  EXPECT_NE(msg.find(needle), std::string::npos) << "expected '" << needle << "' in: " << msg;
}

}  // namespace testing
}  // namespace colt5
