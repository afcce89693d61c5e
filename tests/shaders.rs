//! Every kernel's assembled WGSL validates with naga, without a device.

use gpunorm::kernels::{source, Kernel};
use gpunorm::DType;

#[test]
fn every_kernel_source_validates_with_naga() {
    for kernel in Kernel::ALL {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for paired in [false, true] {
                let src = source(kernel, dtype, paired);
                let what = format!("{kernel:?}/{dtype}/paired {paired}");
                let module = naga::front::wgsl::parse_str(&src)
                    .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(&src)));
                naga::valid::Validator::new(
                    naga::valid::ValidationFlags::all(),
                    naga::valid::Capabilities::all(),
                )
                .validate(&module)
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            }
        }
    }
}
