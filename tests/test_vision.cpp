// The vision example's data and driver: noise-free images hold exactly one bar of the labelled
// orientation inside the image; a few training steps of both models run and report results.
#include "mamba/vision.h"
#include "test_util.h"

using namespace mamba;

TEST(VisionExample, BarsHaveTheLabelledOrientation) {
  Rng rng(3);
  const int64_t S = 7, len = 4;
  vision::ImageBatch b = vision::bars_batch(200, S, len, 0.0, rng);
  ASSERT_EQ(b.images.shape(), (Shape{200, S, S, 1}));
  int seen[vision::kClasses] = {};
  for (int64_t n = 0; n < 200; ++n) {
    const int32_t c = b.labels[n];
    ASSERT_GE(c, 0);
    ASSERT_LT(c, vision::kClasses);
    ++seen[c];
    std::vector<std::pair<int64_t, int64_t>> on;
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) {
        const float v = b.images[(n * S + i) * S + j];
        ASSERT_TRUE(v == 0.f || v == 1.f);
        if (v == 1.f) on.emplace_back(i, j);
      }
    ASSERT_EQ(on.size(), static_cast<size_t>(len));  // row-major order of the pixels
    const int64_t di = on[1].first - on[0].first, dj = on[1].second - on[0].second;
    const int64_t want_di[4] = {0, 1, 1, 1}, want_dj[4] = {1, 0, 1, -1};
    EXPECT_EQ(di, want_di[c]) << "class " << c;
    EXPECT_EQ(dj, want_dj[c]) << "class " << c;
    for (size_t s = 1; s < on.size(); ++s) {
      EXPECT_EQ(on[s].first - on[s - 1].first, di);
      EXPECT_EQ(on[s].second - on[s - 1].second, dj);
    }
  }
  for (int c = 0; c < vision::kClasses; ++c) EXPECT_GT(seen[c], 20) << "class " << c;
  test::expect_error([&] { vision::bars_batch(1, 3, 4, 0.1, rng); }, {"bar_len"});
}

TEST(VisionExample, RunsBothModels) {
  vision::ExampleConfig c;
  c.image = 6, c.bar_len = 3, c.dim = 4, c.vss_depth = 1, c.mamba_depth = 1;
  c.steps = 3, c.batch = 4, c.eval_images = 8;
  std::string out;
  auto r = vision::run_example(c, [&](const std::string& s) { out += s + "\n"; });
  ASSERT_EQ(r.size(), 2u);
  for (const auto& m : r) {
    EXPECT_GE(m.accuracy, 0.0);
    EXPECT_LE(m.accuracy, 1.0);
    EXPECT_GT(m.params, 0);
    EXPECT_TRUE(std::isfinite(m.final_train_loss));
  }
  EXPECT_NE(out.find("VSSBlock x1"), std::string::npos) << out;
  EXPECT_NE(out.find("row-major sequence (4,36,4)"), std::string::npos) << out;
}
