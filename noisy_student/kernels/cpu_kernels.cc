// CPU kernels for the training step's two costliest elementwise and
// depthwise gradients (see noisy_student/cpu_kernels.py, which compiles and
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
