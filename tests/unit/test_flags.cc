#include <gtest/gtest.h>

#include "tools/flags.h"

namespace sp {
namespace {

Flags make() {
  return Flags({{"n", FlagKind::kInt, "4", "a count", 1, 10},
                {"x", FlagKind::kFloat, "0.5", "a number", 0, 1},
                {"mode", FlagKind::kString, "a", "a mode", -1e300, 1e300, {"a", "b"}},
                {"ids", FlagKind::kIntList, "", "ids", -1e300, 1e300, {}, true},
                {"v", FlagKind::kBool, "", "verbose"}});
}

TEST(Flags, ParsesAndDefaults) {
  Flags f = make();
  ASSERT_TRUE(f.parse({"--n", "7", "--ids=1,2", "--ids", "3", "--v"}).is_ok());
  EXPECT_EQ(f.i64("n"), 7);
  EXPECT_EQ(f.f64("x"), 0.5);
  EXPECT_TRUE(f.boolean("v"));
  EXPECT_EQ(f.int_lists("ids"), (std::vector<std::vector<int32_t>>{{1, 2}, {3}}));
}

TEST(Flags, ErrorsNameTheFlag) {
  auto err = [](std::vector<std::string> a) {
    Flags f = make();
    return f.parse(a).message();
  };
  EXPECT_NE(err({"--n", "11"}).find("--n"), std::string::npos);
  EXPECT_NE(err({"--n", "abc"}).find("expected an integer"), std::string::npos);
  EXPECT_NE(err({"--x", "2"}).find("--x"), std::string::npos);
  EXPECT_NE(err({"--mode", "c"}).find("expected one of a, b"), std::string::npos);
  EXPECT_NE(err({"--ids", "1,,2"}).find("--ids"), std::string::npos);
  EXPECT_NE(err({"--ids", "1,-2"}).find("--ids"), std::string::npos);
  EXPECT_NE(err({"--nope"}).find("unknown flag --nope"), std::string::npos);
  EXPECT_NE(err({"--n"}).find("missing value"), std::string::npos);
  EXPECT_NE(err({"--n", "1", "--n", "2"}).find("more than once"), std::string::npos);
  EXPECT_NE(err({"stray"}).find("unexpected argument"), std::string::npos);
}

}  // namespace
}  // namespace sp
