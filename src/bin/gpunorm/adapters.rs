//! `gpunorm adapters`: what wgpu can see, and the limits that matter here.

use std::process::ExitCode;

pub fn run() -> gpunorm::Result<ExitCode> {
    let adapters = gpunorm::context::enumerate_adapters();
    if adapters.is_empty() {
        println!("no adapters (is a Vulkan driver installed? run scripts/ensure-vulkan)");
    }
    for adapter in adapters {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        println!("{}", info.name);
        println!(
            "  backend: {:?}, type: {:?}",
            info.backend, info.device_type
        );
        println!("  driver: {} {}", info.driver, info.driver_info);
        println!(
            "  subgroups: {} (size {}..={})",
            features.contains(gpunorm::wgpu::Features::SUBGROUP),
            info.subgroup_min_size,
            info.subgroup_max_size
        );
        println!(
            "  shader f16: {}",
            features.contains(gpunorm::wgpu::Features::SHADER_F16)
        );
        println!(
            "  timestamp queries: {}",
            features.contains(gpunorm::wgpu::Features::TIMESTAMP_QUERY)
        );
        println!(
            "  max_storage_buffer_binding_size: {}, max_buffer_size: {}",
            limits.max_storage_buffer_binding_size, limits.max_buffer_size
        );
        println!(
            "  max_compute_workgroup_storage_size: {}, max_compute_invocations_per_workgroup: {}, max_compute_workgroups_per_dimension: {}",
            limits.max_compute_workgroup_storage_size,
            limits.max_compute_invocations_per_workgroup,
            limits.max_compute_workgroups_per_dimension
        );
    }
    Ok(ExitCode::SUCCESS)
}
