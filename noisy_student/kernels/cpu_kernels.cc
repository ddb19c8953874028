// CPU kernels for the training step's two costliest elementwise and
// depthwise gradients (see noisy_student/kernels/loader.py, which compiles and
// loads this file, and BENCHMARKS.md, "CPU kernels").
//
// NsSilu / NsSiluGrad: SiLU (swish, x * sigmoid(x); EfficientNet's
// activation) and its gradient, each one pass over memory. TF runs the
// forward as 2 kernels and the gradient as 6 (it recomputes the sigmoid and
// builds s * (1 + x * (1 - s)) one op at a time), each reading and writing
// the whole tensor.
//
// NsDepthwiseFilterGrad: the filter gradient of a depthwise convolution
// with "same" padding, depth multiplier 1 and equal strides (the
// EfficientNet's), accumulated per (image, output row) shard and summed in
// shard order (deterministic). Same padding split as TF: the smaller half on top / left.
//
// float32 only; the Python side uses TF's ops for anything else.
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/util/work_sharder.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace noisy_student {
namespace {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

REGISTER_OP("NsSilu")
    .Input("features: float")
    .Output("activations: float")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("NsSiluGrad")
    .Input("gradients: float")
    .Input("features: float")
    .Output("backprops: float")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("NsDepthwiseFilterGrad")
    .Input("input: float")
    .Input("out_backprop: float")
    .Attr("kernel_size: int >= 1")
    .Attr("stride: int >= 1")
    .Output("filter_backprop: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int k;
      TF_RETURN_IF_ERROR(c->GetAttr("kernel_size", &k));
      c->set_output(0, c->MakeShape({k, k, c->Dim(c->input(0), 3), 1}));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("NsChannelScale")
    .Input("features: float")
    .Input("scale: float")
    .Output("scaled: float")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape);

REGISTER_OP("NsChannelScaleGrad")
    .Input("gradients: float")
    .Input("features: float")
    .Input("scale: float")
    .Output("features_backprop: float")
    .Output("scale_backprop: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("NsBatchNormSilu")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Attr("epsilon: float")
    .Output("y: float")
    .Output("mean: float")
    .Output("variance: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(1));
      return ::tensorflow::OkStatus();
    });

REGISTER_OP("NsBatchNormSiluGrad")
    .Input("gradients: float")
    .Input("x: float")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("mean: float")
    .Input("variance: float")
    .Attr("epsilon: float")
    .Output("x_backprop: float")
    .Output("gamma_backprop: float")
    .Output("beta_backprop: float")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(1));
      c->set_output(1, c->input(2));
      c->set_output(2, c->input(2));
      return ::tensorflow::OkStatus();
    });

// Elements per inner block: small enough that a block's temporaries stay in
// L1, large enough to amortise the loop.
constexpr int64_t kBlock = 1024;

// Runs f(begin, size) over [0, n) in blocks, on TF's intra-op thread pool.
template <typename F>
void ForEachBlock(OpKernelContext* ctx, int64_t n, int64_t cost_per_element,
                  F f) {
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers->num_threads, workers->workers, n,
                      cost_per_element, [&f](int64_t start, int64_t end) {
                        for (int64_t b = start; b < end; b += kBlock) {
                          f(b, std::min(kBlock, end - b));
                        }
                      });
}

class SiluOp : public OpKernel {
 public:
  explicit SiluOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    const float* in = x.flat<float>().data();
    float* out = y->flat<float>().data();
    ForEachBlock(ctx, x.NumElements(), 20, [in, out](int64_t b, int64_t m) {
      Eigen::Map<const Eigen::ArrayXf> v(in + b, m);
      Eigen::Map<Eigen::ArrayXf>(out + b, m) = v / (1.0f + (-v).exp());
    });
  }
};

class SiluGradOp : public OpKernel {
 public:
  explicit SiluGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                ::tensorflow::errors::InvalidArgument(
                    "Expected gradients and features of one shape. Received: ",
                    dy.shape().DebugString(), " and ",
                    x.shape().DebugString()));
    Tensor* dx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0,
                                                              x.shape(), &dx));
    const float* g = dy.flat<float>().data();
    const float* in = x.flat<float>().data();
    float* out = dx->flat<float>().data();
    // d/dx x * s(x) = s + x * s * (1 - s), s the sigmoid.
    ForEachBlock(ctx, x.NumElements(), 40, [g, in, out](int64_t b, int64_t m) {
      Eigen::Map<const Eigen::ArrayXf> v(in + b, m), gv(g + b, m);
      const Eigen::ArrayXf s = 1.0f / (1.0f + (-v).exp());
      Eigen::Map<Eigen::ArrayXf>(out + b, m) = gv * s * (1.0f + v * (1.0f - s));
    });
  }
};

// a[c] += x[c] * g[c] for c < n (vectorised by the compiler).
inline void MultiplyAdd(float* __restrict__ a, const float* __restrict__ x,
                        const float* __restrict__ g, int64_t n) {
  for (int64_t c = 0; c < n; ++c) a[c] += x[c] * g[c];
}

class DepthwiseFilterGradOp : public OpKernel {
 public:
  explicit DepthwiseFilterGradOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("kernel_size", &kernel_size_));
    OP_REQUIRES_OK(c, c->GetAttr("stride", &stride_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& dy = ctx->input(1);
    OP_REQUIRES(ctx, x.dims() == 4 && dy.dims() == 4 &&
                         x.dim_size(0) == dy.dim_size(0) &&
                         x.dim_size(3) == dy.dim_size(3),
                ::tensorflow::errors::InvalidArgument(
                    "Expected NHWC input and out_backprop of one batch and "
                    "channel count. Received: ",
                    x.shape().DebugString(), " and ",
                    dy.shape().DebugString()));
    const int64_t k = kernel_size_, s = stride_;
    const int64_t batch = x.dim_size(0), height = x.dim_size(1);
    const int64_t width = x.dim_size(2), channels = x.dim_size(3);
    const int64_t out_height = dy.dim_size(1), out_width = dy.dim_size(2);
    OP_REQUIRES(ctx, out_height == (height + s - 1) / s &&
                         out_width == (width + s - 1) / s,
                ::tensorflow::errors::InvalidArgument(
                    "Expected the out_backprop of a 'same' convolution with "
                    "stride ", s, ". Received: ", x.shape().DebugString(),
                    " and ", dy.shape().DebugString()));
    const int64_t pad_top =
        std::max<int64_t>((out_height - 1) * s + k - height, 0) / 2;
    const int64_t pad_left =
        std::max<int64_t>((out_width - 1) * s + k - width, 0) / 2;
    Tensor* dw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({k, k, channels, 1}), &dw));
    const int64_t taps = k * k * channels;
    float* total = dw->flat<float>().data();
    std::fill(total, total + taps, 0.0f);
    const float* in = x.flat<float>().data();
    const float* grad = dy.flat<float>().data();
    // Per-shard sums, added in shard order so that the result does not
    // depend on thread timing (a resumed run must equal an uninterrupted
    // one bit for bit).
    std::map<int64_t, std::vector<float>> partial;
    std::mutex mu;
    auto rows = [&](int64_t start, int64_t end) {
      std::vector<float> acc(taps, 0.0f);
      for (int64_t r = start; r < end; ++r) {
        const int64_t n = r / out_height, oh = r % out_height;
        for (int64_t ow = 0; ow < out_width; ++ow) {
          const float* g = grad + ((n * out_height + oh) * out_width + ow) *
                                      channels;
          for (int64_t ki = 0; ki < k; ++ki) {
            const int64_t ih = oh * s + ki - pad_top;
            if (ih < 0 || ih >= height) continue;
            for (int64_t kj = 0; kj < k; ++kj) {
              const int64_t iw = ow * s + kj - pad_left;
              if (iw < 0 || iw >= width) continue;
              MultiplyAdd(acc.data() + (ki * k + kj) * channels,
                          in + ((n * height + ih) * width + iw) * channels, g,
                          channels);
            }
          }
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      partial.emplace(start, std::move(acc));
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers->num_threads, workers->workers,
                        batch * out_height, out_width * k * k * channels * 3,
                        rows);
    for (const auto& [start, acc] : partial) {
      for (int64_t i = 0; i < taps; ++i) total[i] += acc[i];
    }
  }

 private:
  int kernel_size_;
  int stride_;
};

// Checks features [N, H, W, C] and scale [N, 1, 1, C].
void CheckChannelScale(OpKernelContext* ctx, const Tensor& x,
                          const Tensor& scale) {
  OP_REQUIRES(ctx, x.dims() == 4 && scale.dims() == 4 &&
                       scale.dim_size(0) == x.dim_size(0) &&
                       scale.dim_size(1) == 1 && scale.dim_size(2) == 1 &&
                       scale.dim_size(3) == x.dim_size(3),
              ::tensorflow::errors::InvalidArgument(
                  "Expected features [N, H, W, C] and scale [N, 1, 1, C]. "
                  "Received: ", x.shape().DebugString(), " and ",
                  scale.shape().DebugString()));
}

// Squeeze-and-excitation's gate: y[n, h, w, c] = x[n, h, w, c] * g[n, c].
class ChannelScaleOp : public OpKernel {
 public:
  explicit ChannelScaleOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    CheckChannelScale(ctx, x, scale);
    if (!ctx->status().ok()) return;
    const int64_t pixels = x.dim_size(1) * x.dim_size(2);
    const int64_t channels = x.dim_size(3);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    const float* in = x.flat<float>().data();
    const float* g = scale.flat<float>().data();
    float* out = y->flat<float>().data();
    auto images = [&](int64_t start, int64_t end) {
      for (int64_t n = start; n < end; ++n) {
        const float* gn = g + n * channels;
        for (int64_t p = 0; p < pixels; ++p) {
          const int64_t offset = (n * pixels + p) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            out[offset + c] = in[offset + c] * gn[c];
          }
        }
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers->num_threads, workers->workers, x.dim_size(0),
                        pixels * channels * 2, images);
  }
};

// Its gradient in one pass: dx = dy * g, dg[n, c] = sum over (h, w) of
// dy * x (one image per shard: deterministic).
class ChannelScaleGradOp : public OpKernel {
 public:
  explicit ChannelScaleGradOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& scale = ctx->input(2);
    CheckChannelScale(ctx, x, scale);
    if (!ctx->status().ok()) return;
    const int64_t pixels = x.dim_size(1) * x.dim_size(2);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                ::tensorflow::errors::InvalidArgument(
                    "Expected gradients of the features' shape. Received: ",
                    dy.shape().DebugString(), " and ",
                    x.shape().DebugString()));
    const int64_t channels = x.dim_size(3);
    Tensor* dx = nullptr;
    Tensor* dg = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, scale.shape(), &dg));
    const float* grad = dy.flat<float>().data();
    const float* in = x.flat<float>().data();
    const float* g = scale.flat<float>().data();
    float* out = dx->flat<float>().data();
    float* out_scale = dg->flat<float>().data();
    auto images = [&](int64_t start, int64_t end) {
      std::vector<float> acc(channels);
      for (int64_t n = start; n < end; ++n) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        const float* gn = g + n * channels;
        for (int64_t p = 0; p < pixels; ++p) {
          const int64_t offset = (n * pixels + p) * channels;
          for (int64_t c = 0; c < channels; ++c) {
            out[offset + c] = grad[offset + c] * gn[c];
          }
          MultiplyAdd(acc.data(), in + offset, grad + offset, channels);
        }
        std::copy(acc.begin(), acc.end(), out_scale + n * channels);
      }
    };
    auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers->num_threads, workers->workers, x.dim_size(0),
                        pixels * channels * 4, images);
  }
};

// Elements per shard of the batch-norm kernels (a shard's temporaries stay
// in L2). Per-shard channel sums are added in shard order, and the shards
// depend on the shape only, not on the threads: deterministic.
constexpr int64_t kShardElements = 16384;

int64_t PixelsPerShard(int64_t channels) {
  return std::max<int64_t>(1, kShardElements / std::max<int64_t>(channels, 1));
}

int64_t PixelShards(int64_t total, int64_t channels) {
  return (total + PixelsPerShard(channels) - 1) / PixelsPerShard(channels);
}

// Runs f(first_pixel, pixels, shard) over [0, total) in those shards, on
// TF's pool.
template <typename F>
void ForEachPixelShard(OpKernelContext* ctx, int64_t total, int64_t channels,
                       F f) {
  const int64_t per_shard = PixelsPerShard(channels);
  auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  ::tensorflow::Shard(workers->num_threads, workers->workers,
                      PixelShards(total, channels), per_shard * channels * 10,
                      [&](int64_t start, int64_t end) {
                        for (int64_t i = start; i < end; ++i) {
                          const int64_t first = i * per_shard;
                          f(first, std::min(per_shard, total - first), i);
                        }
                      });
}

using ArrayXXfMap = Eigen::Map<Eigen::ArrayXXf>;
using ConstArrayXXfMap = Eigen::Map<const Eigen::ArrayXXf>;

// Checks x [N, H, W, C] and per-channel inputs [C].
void CheckBatchNorm(OpKernelContext* ctx, const Tensor& x,
                    std::initializer_list<const Tensor*> per_channel) {
  OP_REQUIRES(ctx, x.dims() == 4,
              ::tensorflow::errors::InvalidArgument(
                  "Expected x [N, H, W, C]. Received: ",
                  x.shape().DebugString()));
  for (const Tensor* t : per_channel) {
    OP_REQUIRES(ctx, t->dims() == 1 && t->dim_size(0) == x.dim_size(3),
                ::tensorflow::errors::InvalidArgument(
                    "Expected per-channel inputs [", x.dim_size(3),
                    "]. Received: ", t->shape().DebugString()));
  }
}

// Training-mode batch norm (batch statistics, biased variance, as Keras and
// FusedBatchNormV3 normalise) followed by SiLU: y = silu(gamma * (x - mean)
// / sqrt(variance + epsilon) + beta). One pass for the statistics (sums in
// double), one for the output, where TF makes two passes for batch norm and
// another for the SiLU.
class BatchNormSiluOp : public OpKernel {
 public:
  explicit BatchNormSiluOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(1);
    const Tensor& beta = ctx->input(2);
    CheckBatchNorm(ctx, x, {&gamma, &beta});
    if (!ctx->status().ok()) return;
    const int64_t channels = x.dim_size(3);
    const int64_t total = x.NumElements() / std::max<int64_t>(channels, 1);
    Tensor *y, *mean, *variance;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, gamma.shape(), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, gamma.shape(), &variance));
    if (total == 0) return;
    const float* in = x.flat<float>().data();
    const int64_t shards = PixelShards(total, channels);
    Eigen::ArrayXXd sums(2 * channels, shards);
    ForEachPixelShard(ctx, total, channels,
                      [&](int64_t first, int64_t pixels, int64_t shard) {
      ConstArrayXXfMap v(in + first * channels, channels, pixels);
      sums.col(shard).head(channels) = v.rowwise().sum().cast<double>();
      sums.col(shard).tail(channels) =
          v.square().rowwise().sum().cast<double>();
    });
    const Eigen::ArrayXd total_sums = sums.rowwise().sum();
    const Eigen::ArrayXd m = total_sums.head(channels) / total;
    const Eigen::ArrayXd var =
        (total_sums.tail(channels) / total - m.square()).max(0.0);
    Eigen::Map<Eigen::ArrayXf>(mean->flat<float>().data(), channels) =
        m.cast<float>();
    Eigen::Map<Eigen::ArrayXf>(variance->flat<float>().data(), channels) =
        var.cast<float>();
    const Eigen::ArrayXf scale =
        Eigen::Map<const Eigen::ArrayXf>(gamma.flat<float>().data(),
                                         channels) *
        (var + epsilon_).rsqrt().cast<float>();
    const Eigen::ArrayXf shift =
        Eigen::Map<const Eigen::ArrayXf>(beta.flat<float>().data(),
                                         channels) -
        m.cast<float>() * scale;
    float* out = y->flat<float>().data();
    ForEachPixelShard(ctx, total, channels,
                      [&](int64_t first, int64_t pixels, int64_t) {
      ConstArrayXXfMap v(in + first * channels, channels, pixels);
      const Eigen::ArrayXXf z =
          (v.colwise() * scale).colwise() + shift;
      ArrayXXfMap(out + first * channels, channels, pixels) =
          z / (1.0f + (-z).exp());
    });
  }

 private:
  float epsilon_;
};

// Its gradient: dz = dy * silu'(z) (z recomputed), then batch norm's
// training-mode gradient, dx = gamma / std * (dz - mean(dz) - xhat *
// mean(dz * xhat)), dgamma = sum(dz * xhat), dbeta = sum(dz). Two passes
// (dz is kept in dx's buffer between them).
class BatchNormSiluGradOp : public OpKernel {
 public:
  explicit BatchNormSiluGradOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, c->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& gamma = ctx->input(2);
    const Tensor& beta = ctx->input(3);
    const Tensor& mean = ctx->input(4);
    const Tensor& variance = ctx->input(5);
    CheckBatchNorm(ctx, x, {&gamma, &beta, &mean, &variance});
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                ::tensorflow::errors::InvalidArgument(
                    "Expected gradients of x's shape. Received: ",
                    dy.shape().DebugString(), " and ",
                    x.shape().DebugString()));
    const int64_t channels = x.dim_size(3);
    const int64_t total = x.NumElements() / std::max<int64_t>(channels, 1);
    Tensor *dx, *dgamma, *dbeta;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, gamma.shape(), &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, gamma.shape(), &dbeta));
    auto channel = [channels](const Tensor& t) {
      return Eigen::Map<const Eigen::ArrayXf>(t.flat<float>().data(),
                                              channels);
    };
    const Eigen::ArrayXf inv_std = (channel(variance) + epsilon_).rsqrt();
    const Eigen::ArrayXf scale = channel(gamma) * inv_std;
    const Eigen::ArrayXf shift = channel(beta) - channel(mean) * scale;
    const Eigen::ArrayXf m = channel(mean);
    const float* in = x.flat<float>().data();
    const float* grad = dy.flat<float>().data();
    float* out = dx->flat<float>().data();
    float* out_gamma = dgamma->flat<float>().data();
    float* out_beta = dbeta->flat<float>().data();
    if (total == 0) {
      std::fill(out_gamma, out_gamma + channels, 0.0f);
      std::fill(out_beta, out_beta + channels, 0.0f);
      return;
    }
    const int64_t shards = PixelShards(total, channels);
    Eigen::ArrayXXd sums(2 * channels, shards);
    ForEachPixelShard(ctx, total, channels,
                      [&](int64_t first, int64_t pixels, int64_t shard) {
      ConstArrayXXfMap v(in + first * channels, channels, pixels);
      ConstArrayXXfMap g(grad + first * channels, channels, pixels);
      ArrayXXfMap dz(out + first * channels, channels, pixels);
      const Eigen::ArrayXXf z = (v.colwise() * scale).colwise() + shift;
      const Eigen::ArrayXXf s = 1.0f / (1.0f + (-z).exp());
      dz = g * s * (1.0f + z * (1.0f - s));
      const Eigen::ArrayXXf xhat = (v.colwise() - m).colwise() * inv_std;
      sums.col(shard).head(channels) = dz.rowwise().sum().cast<double>();
      sums.col(shard).tail(channels) =
          (dz * xhat).rowwise().sum().cast<double>();
    });
    const Eigen::ArrayXd total_sums = sums.rowwise().sum();
    const Eigen::ArrayXf sum_dz = total_sums.head(channels).cast<float>();
    const Eigen::ArrayXf sum_dz_xhat = total_sums.tail(channels).cast<float>();
    Eigen::Map<Eigen::ArrayXf>(out_beta, channels) = sum_dz;
    Eigen::Map<Eigen::ArrayXf>(out_gamma, channels) = sum_dz_xhat;
    const Eigen::ArrayXf mean_dz = sum_dz / total;
    const Eigen::ArrayXf mean_dz_xhat = sum_dz_xhat / total;
    ForEachPixelShard(ctx, total, channels,
                      [&](int64_t first, int64_t pixels, int64_t) {
      ConstArrayXXfMap v(in + first * channels, channels, pixels);
      ArrayXXfMap dz(out + first * channels, channels, pixels);
      const Eigen::ArrayXXf xhat = (v.colwise() - m).colwise() * inv_std;
      dz = ((dz.colwise() - mean_dz) - xhat.colwise() * mean_dz_xhat)
               .colwise() * scale;
    });
  }

 private:
  float epsilon_;
};

REGISTER_KERNEL_BUILDER(
    Name("NsBatchNormSilu").Device(::tensorflow::DEVICE_CPU),
    BatchNormSiluOp);
REGISTER_KERNEL_BUILDER(
    Name("NsBatchNormSiluGrad").Device(::tensorflow::DEVICE_CPU),
    BatchNormSiluGradOp);
REGISTER_KERNEL_BUILDER(
    Name("NsChannelScale").Device(::tensorflow::DEVICE_CPU), ChannelScaleOp);
REGISTER_KERNEL_BUILDER(
    Name("NsChannelScaleGrad").Device(::tensorflow::DEVICE_CPU),
    ChannelScaleGradOp);
REGISTER_KERNEL_BUILDER(Name("NsSilu").Device(::tensorflow::DEVICE_CPU),
                        SiluOp);
REGISTER_KERNEL_BUILDER(Name("NsSiluGrad").Device(::tensorflow::DEVICE_CPU),
                        SiluGradOp);
REGISTER_KERNEL_BUILDER(
    Name("NsDepthwiseFilterGrad").Device(::tensorflow::DEVICE_CPU),
    DepthwiseFilterGradOp);

}  // namespace
}  // namespace noisy_student
