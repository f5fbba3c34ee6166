// The README's library example, compiled and run as written, so the README stays true.
#include "mamba/nn/mamba1.h"
#include "test_util.h"

TEST(Readme, LibraryExampleRuns) {
  mamba::Mamba1Config cfg;  // mamba_ssm's Mamba(d_model=16, d_state=64, ...)
  cfg.d_model = 16;
  cfg.d_state = 64;
  mamba::Mamba1 layer(cfg, /*seed=*/0);
  mamba::Tensor x({2, 32, 16});  // (B, L, d_model)
  mamba::Mamba1Saved saved;
  mamba::Tensor y = layer.forward(x, &saved);   // (B, L, d_model)
  mamba::Tensor dx = layer.backward(saved, y);  // parameter gradients accumulate in layer.params()
  auto state = layer.new_state(2);              // conv_state (B, D, K), ssm_state (B, D, N)
  mamba::Tensor xt({2, 16});                    // one token per sequence: (B, d_model)
  mamba::Tensor yt = layer.step(xt, state);     // (B, d_model), state advanced in place
  EXPECT_EQ(layer.params().count(), 7968);
  EXPECT_EQ(y.shape(), (mamba::Shape{2, 32, 16}));
  EXPECT_EQ(dx.shape(), (mamba::Shape{2, 32, 16}));
  EXPECT_EQ(yt.shape(), (mamba::Shape{2, 16}));
  EXPECT_EQ(state.ssm_state.shape(), (mamba::Shape{2, 32, 64}));
  EXPECT_THROW(layer.forward(mamba::Tensor({2, 32, 15})), mamba::Error);  // wrong d_model
}
