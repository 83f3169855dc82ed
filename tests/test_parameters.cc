// Flat parameter storage: Tensor::View, the arenas of ParameterStore and the views into them, and
// the CPU backend's memory ops they use (CopyFromHost, Convert).
#include <gtest/gtest.h>

#include <cstring>

#include "worker/parameters.h"

namespace mamba {
namespace {

TEST(TensorView, SharesAndKeepsAliveTheBuffer) {
  Tensor view;
  float* base;
  {
    Tensor t = Tensor::Empty({4, 5}, DType::kF32);
    base = t.data<float>();
    for (int i = 0; i < 20; ++i) base[i] = float(i);
    view = t.View(7, {3, 2});
  }
  EXPECT_EQ(view.shape(), (Shape{3, 2}));
  EXPECT_EQ(view.data<float>(), base + 7);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(view.data<float>()[i], float(7 + i));
  // A view of a view, and Slice as a view of rows.
  EXPECT_EQ(view.View(2, {4}).data<float>()[0], 9.f);
  Tensor t = Tensor::Empty({4, 5}, DType::kF64);
  EXPECT_EQ(t.Slice(1, 3).raw(), t.View(5, {2, 5}).raw());
  EXPECT_EQ(t.View(20, {0}).numel(), 0);  // empty, at the end
}

TEST(TensorView, OutOfBoundsIsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Tensor t = Tensor::Empty({4, 5}, DType::kF32);
  EXPECT_DEATH(t.View(15, {2, 3}), "view \\(2, 3\\) at element 15 of Tensor\\(4, 5\\)");
  EXPECT_DEATH(t.View(-1, {2}), "view \\(2\\) at element -1");
  EXPECT_DEATH(t.Slice(2, 5), "slice \\[2, 5\\)");
}

// Parameters of both groups, interleaved, of sizes that are not multiples of the alignment.
void AddMixed(ParameterStore& store) {
  store.Add("a", {3, 5}, true);
  store.Add("b", {7}, false);
  store.Add("c", {65}, true);
  store.Add("d", {2, 1, 3}, false);
  store.Add("e", {64}, true);
}

TEST(ParameterStore, ValuesAndGradsAreAlignedViewsIntoOneArenaPerGroup) {
  auto backend = MakeCpuBackend();
  ParameterStore store(5);
  AddMixed(store);
  store.Allocate(backend.get(), DType::kF32);
  const auto& params = store.parameters();
  const auto& groups = store.groups();
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_TRUE(groups[0].weight_decay);  // in order of first appearance
  EXPECT_FALSE(groups[1].weight_decay);
  const std::vector<std::pair<size_t, int64_t>> where = {
      {0, 0}, {1, 0}, {0, 64}, {1, 64}, {0, 192}};
  EXPECT_EQ(groups[0].values.numel(), 256);
  EXPECT_EQ(groups[1].values.numel(), 128);
  for (size_t i = 0; i < params.size(); ++i) {
    const auto [g, offset] = where[i];
    SCOPED_TRACE(params[i].name);
    EXPECT_EQ(params[i].weight_decay, groups[g].weight_decay);
    EXPECT_EQ(params[i].value.data<float>(), groups[g].values.data<float>() + offset);
    EXPECT_EQ(params[i].grad.data<float>(), groups[g].grads.data<float>() + offset);
    EXPECT_EQ(offset % ParameterStore::kAlign, 0);
    EXPECT_FALSE(params[i].value_bf16.defined());  // the CPU GEMMs want the param dtype
  }
  EXPECT_EQ(params[3].value.shape(), (Shape{2, 1, 3}));
  for (const ParameterGroup& g : groups) EXPECT_FALSE(g.values_bf16.defined());
  // Arenas start zeroed (gaps included); writes through a view land in the arena.
  for (const ParameterGroup& g : groups) {
    for (int64_t i = 0; i < g.values.numel(); ++i) {
      ASSERT_EQ(g.values.data<float>()[i], 0.f);
      ASSERT_EQ(g.grads.data<float>()[i], 0.f);
    }
  }
  params[2].grad.data<float>()[1] = 5.f;
  EXPECT_EQ(groups[0].grads.data<float>()[65], 5.f);
  store.ZeroGrads();
  EXPECT_EQ(params[2].grad.data<float>()[1], 0.f);
  store.CheckViews();
}

TEST(ParameterStore, CopyFromHostWritesIntoTheView) {
  auto backend = MakeCpuBackend();
  ParameterStore store(5);
  AddMixed(store);
  store.Allocate(backend.get(), DType::kF64);
  const Parameter& d = store.parameters()[3];
  const void* before = d.value.raw();
  Tensor host = Tensor::Empty({2, 1, 3}, DType::kF64);
  for (int i = 0; i < 6; ++i) host.data<double>()[i] = 0.5 * i;
  store.CopyFromHost(d, host);
  EXPECT_EQ(d.value.raw(), before);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(store.groups()[1].values.data<double>()[64 + i], 0.5 * i);
  store.CheckViews();
}

TEST(ParameterStore, ViewsOfArenasLaidOutLikeTheGroups) {
  auto backend = MakeCpuBackend();
  ParameterStore store(5);
  AddMixed(store);
  store.Allocate(backend.get(), DType::kF32);
  std::vector<Tensor> arenas;
  for (const ParameterGroup& g : store.groups())
    arenas.push_back(Tensor::Zeros({g.values.numel()}, DType::kF32));
  const std::vector<Tensor> views = store.Views(arenas);
  ASSERT_EQ(views.size(), 5u);
  EXPECT_EQ(views[2].data<float>(), arenas[0].data<float>() + 64);
  EXPECT_EQ(views[3].data<float>(), arenas[1].data<float>() + 64);
  EXPECT_EQ(views[3].shape(), (Shape{2, 1, 3}));
}

TEST(ParameterStore, MisuseIsAnError) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto backend = MakeCpuBackend();
  ParameterStore store(1);
  store.Add("w", {3}, true);
  EXPECT_DEATH(store.Add("x", {3}, true), "more parameters than the store's capacity");
  store.Allocate(backend.get(), DType::kF32);
  Parameter stranger;
  stranger.name = "stranger";
  EXPECT_DEATH(store.CopyFromHost(stranger, Tensor::Zeros({3}, DType::kF32)),
               "parameter stranger does not belong to this store");
  EXPECT_DEATH(
      {
        const_cast<Parameter&>(store.parameters()[0]).value = Tensor::Zeros({3}, DType::kF32);
        store.CheckViews();
      },
      "parameter w: its value .* is no longer its view into the parameter arena");
}

TEST(CpuBackend, CopyFromHostAndConvert) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  auto backend = MakeCpuBackend();
  Tensor host = Tensor::Empty({3}, DType::kF32);
  host.data<float>()[0] = 1.5f;
  host.data<float>()[1] = -2.f;
  host.data<float>()[2] = 0.1f;
  Tensor dst = Tensor::Zeros({3}, DType::kF32);
  backend->CopyFromHost(host, dst);
  EXPECT_EQ(std::memcmp(dst.raw(), host.raw(), host.nbytes()), 0);
  Tensor wide = Tensor::Empty({3}, DType::kF64);
  backend->Convert(host, wide);
  EXPECT_EQ(wide.data<double>()[2], double(0.1f));
  Tensor bf16 = Tensor::Empty({3}, DType::kBF16);
  EXPECT_DEATH(backend->Convert(host, bf16),
               "CPU backend supports float32 and float64, got .*bfloat16");
  EXPECT_DEATH(backend->CopyFromHost(host, wide), "copy_from_host");
}

}  // namespace
}  // namespace mamba
