// Per-device loading of the embedded kernel images (see kernel_image.h for the selection rule).
#include "kernel_image.h"

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <mutex>

#include "cuda_driver.h"

namespace hardneg {
namespace {

// Entry-point names in loss_kernel_index order (hardneg_loss_kernels.h).
#define HARDNEG_KERNEL_NAME(kernel, mode, mode_name, mask, mask_name, threads, width_name) \
  "hardneg_loss_" #kernel "_" #mode_name "_" #mask_name "_" #width_name,
constexpr std::array<const char*, kNumLossKernelInstances> kKernelNames = {
    HARDNEG_KERNEL_INSTANCES(HARDNEG_KERNEL_NAME)};
#undef HARDNEG_KERNEL_NAME

// Errors that mean "this image cannot run here", after which the next candidate is tried.
bool image_rejected(CUresult err) {
  return err == CUDA_ERROR_INVALID_IMAGE || err == CUDA_ERROR_NO_BINARY_FOR_GPU ||
         err == CUDA_ERROR_INVALID_PTX || err == CUDA_ERROR_UNSUPPORTED_PTX_VERSION ||
         err == CUDA_ERROR_JIT_COMPILER_NOT_FOUND;
}

struct DeviceKernels {
  CUmodule module = nullptr;
  std::string image;
  std::array<CUfunction, kNumLossKernelInstances> functions{};
};

int compute_capability(int device) {
  const CudaDriver& cu = cuda_driver();
  CUdevice handle = 0;
  int major = 0, minor = 0;
  HARDNEG_CU_CHECK(cu.device_get(&handle, device));
  HARDNEG_CU_CHECK(
      cu.device_get_attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle));
  HARDNEG_CU_CHECK(
      cu.device_get_attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle));
  return major * 10 + minor;
}

std::unique_ptr<DeviceKernels> load_device_kernels(int device) {
  const CudaDriver& cu = cuda_driver();
  const int sm = compute_capability(device);
  auto out = std::make_unique<DeviceKernels>();
  std::string tried;
  for (const KernelImage* image : select_kernel_images(kernel_images(), sm)) {
    const CUresult err = cu.module_load_data(&out->module, image->data);
    if (err == CUDA_SUCCESS) {
      out->image = std::string(image->name) + (image->is_ptx ? " (JIT)" : "");
      break;
    }
    if (!image_rejected(err)) HARDNEG_CU_CHECK(err);
    const char* name = nullptr;
    cu.get_error_name(err, &name);
    tried += std::string(tried.empty() ? "" : ", ") + image->name + ": " + (name ? name : "?");
  }
  if (out->module == nullptr) {
    throw std::runtime_error("hardneg: no kernel image of this build runs on device " +
                             std::to_string(device) + " (sm_" + std::to_string(sm) +
                             ", driver CUDA " + std::to_string(cuda_driver_version()) +
                             "); tried: " + (tried.empty() ? "none matches" : tried) +
                             ". Rebuild with CMAKE_CUDA_ARCHITECTURES including " +
                             std::to_string(sm) + ", or update the NVIDIA driver");
  }
  for (int i = 0; i < kNumLossKernelInstances; ++i) {
    HARDNEG_CU_CHECK(cu.module_get_function(&out->functions[i], out->module, kKernelNames[i]));
  }
  return out;
}

const DeviceKernels& device_kernels(int device) {
  static std::map<int, std::unique_ptr<DeviceKernels>> loaded;  // modules live until exit
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  auto& slot = loaded[device];
  if (!slot) slot = load_device_kernels(device);
  return *slot;
}

}  // namespace

std::vector<const KernelImage*> select_kernel_images(const std::vector<KernelImage>& images,
                                                     int sm) {
  std::vector<const KernelImage*> cubins, ptx;
  for (const KernelImage& image : images) {
    if (image.sm > sm) continue;
    if (image.is_ptx) {
      ptx.push_back(&image);
    } else if (image.sm / 10 == sm / 10) {
      cubins.push_back(&image);  // SASS runs on the same major architecture, same or newer minor
    }
  }
  const auto newest_first = [](const KernelImage* a, const KernelImage* b) {
    return a->sm > b->sm;
  };
  std::stable_sort(cubins.begin(), cubins.end(), newest_first);
  std::stable_sort(ptx.begin(), ptx.end(), newest_first);
  if (!ptx.empty()) cubins.push_back(ptx.front());  // the JIT fallback
  return cubins;
}

CUfunction loss_kernel_function(int device, int index) {
  return device_kernels(device).functions.at(static_cast<size_t>(index));
}

std::string loaded_kernel_image(int device) {
  const ContextGuard guard(device);
  return device_kernels(device).image;
}

}  // namespace hardneg
