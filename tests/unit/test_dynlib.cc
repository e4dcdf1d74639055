#include <gtest/gtest.h>

#include "core/dynlib.h"

namespace sp {
namespace {

TEST(DynLib, OpensTheFirstNameFoundAndLooksUpSymbols) {
  DynLib lib({"libsp-no-such-library.so.7", "libm.so.6"});
  ASSERT_TRUE(lib.loaded()) << lib.load_error();
  EXPECT_EQ(lib.load_error(), "");
  double (*cosine)(double) = nullptr;
  lib.get(cosine, "cos");
  ASSERT_NE(cosine, nullptr);
  EXPECT_EQ(cosine(0.0), 1.0);
  EXPECT_EQ(lib.missing(), "");
}

TEST(DynLib, NamesMissingSymbols) {
  DynLib lib({"libm.so.6"});
  ASSERT_TRUE(lib.loaded());
  void (*a)() = nullptr;
  void (*b)() = nullptr;
  lib.get(a, "sp_no_such_symbol_a");
  lib.get(b, "sp_no_such_symbol_b");
  EXPECT_EQ(a, nullptr);
  EXPECT_EQ(b, nullptr);
  EXPECT_EQ(lib.missing(), "sp_no_such_symbol_a, sp_no_such_symbol_b");
}

TEST(DynLib, SaysWhyNothingLoaded) {
  DynLib lib({"libsp-no-such-library.so.7"});
  EXPECT_FALSE(lib.loaded());
  EXPECT_NE(lib.load_error().find("libsp-no-such-library.so.7"), std::string::npos)
      << lib.load_error();
  void (*f)() = nullptr;
  lib.get(f, "anything");
  EXPECT_EQ(f, nullptr);
  EXPECT_EQ(lib.missing(), "anything");
}

}  // namespace
}  // namespace sp
