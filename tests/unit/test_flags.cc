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

TEST(Flags, IntegersAreStrictAndNeverWrap) {
  auto err = [](std::vector<std::string> a) {
    Flags f = make();
    Status st = f.parse(a);
    EXPECT_FALSE(st.is_ok());
    return st.message();
  };
  for (const char* v :
       {"18446744073709551617", "99999999999999999999", " 4", "+4", "4 ", "0x4", "4e0", ""})
    EXPECT_NE(err({"--n", v}).find("--n"), std::string::npos) << v;
  // Token ids: 2^32 + 1 used to be refused only by the int32 check; a wide one must not wrap.
  EXPECT_NE(err({"--ids", "4294967297"}).find("--ids"), std::string::npos);
  EXPECT_NE(err({"--ids", "1,2,"}).find("--ids"), std::string::npos);
  EXPECT_NE(err({"--ids", "+1"}).find("--ids"), std::string::npos);
  // A long value is echoed truncated.
  EXPECT_LT(err({"--ids", std::string(100000, '9')}).size(), 400u);
}

TEST(Flags, PartitionAndFaultInjectAreValidated) {
  Flags f(
      {{"pp-partition", FlagKind::kString, "vllm", "p"}, {"fault", FlagKind::kString, "", "f"}});
  auto check = [](Status (*v)(const std::string&, const std::string&), const std::string& value) {
    return v("flag", value).is_ok();
  };
  for (const char* ok : {"vllm", "auto", "11,11,11,10", "1", "1048576"})
    EXPECT_TRUE(check(validate_pp_partition, ok)) << ok;
  // 2147483647,2147483647,7 summed to 5 in int; 4294967298,4294967299 became 2,3.
  for (const char* bad : {"2147483647,2147483647,7", "4294967298,4294967299", "0,5", "-1,6", "2,3,",
                          ",5", "2,,3", "1048577", "a", ""})
    EXPECT_FALSE(check(validate_pp_partition, bad)) << bad;
  for (const char* ok : {"0:3", "1:0:kill", "4095:7:error", "2:5:stall", "1:load:stall"})
    EXPECT_TRUE(check(validate_fault_inject, ok)) << ok;
  for (const char* bad : {"99999999999:1", "4096:1", "0:-1", "0:1:boom", "0", "0:1:", ":1", "a:b",
                          "0:1:kill:x", "1:load", "1:load:kill", "1:load:error", "4096:load:stall",
                          "1:load:stall:x", "-1:load:stall"})
    EXPECT_FALSE(check(validate_fault_inject, bad)) << bad;
  // Hooked into a spec, a bad value is an error that names the flag.
  std::vector<FlagSpec> specs = {{"pp-partition", FlagKind::kString, "vllm", "p"}};
  specs[0].validate = validate_pp_partition;
  Flags g(specs);
  Status st = g.parse({"--pp-partition", "4294967298,4294967299"});
  ASSERT_FALSE(st.is_ok());
  EXPECT_NE(st.message().find("--pp-partition"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace sp
