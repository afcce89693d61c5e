//! `gpunorm adapters`: what wgpu can see, and the limits that matter here.

use std::process::ExitCode;

pub fn run() -> gpunorm::Result<ExitCode> {
    let adapters = gpunorm::context::enumerate_adapters();
    if adapters.is_empty() {
        outln!("no adapters (is a Vulkan driver installed? run scripts/ensure-vulkan)")?;
    }
    for adapter in adapters {
        let info = adapter.get_info();
        let limits = adapter.limits();
        let features = adapter.features();
        outln!("{}", info.name)?;
        outln!(
            "  backend: {:?}, type: {:?}",
            info.backend,
            info.device_type
        )?;
        outln!("  driver: {} {}", info.driver, info.driver_info)?;
        outln!(
            "  subgroups: {} (size {}..={})",
            features.contains(gpunorm::wgpu::Features::SUBGROUP),
            info.subgroup_min_size,
            info.subgroup_max_size
        )?;
        outln!(
            "  shader f16: {}",
            features.contains(gpunorm::wgpu::Features::SHADER_F16)
        )?;
        outln!(
            "  timestamp queries: {}",
            features.contains(gpunorm::wgpu::Features::TIMESTAMP_QUERY)
        )?;
        outln!(
            "  max_storage_buffer_binding_size: {}, max_buffer_size: {}",
            limits.max_storage_buffer_binding_size,
            limits.max_buffer_size
        )?;
        outln!(
            "  max_compute_workgroup_storage_size: {}, max_compute_invocations_per_workgroup: {}, max_compute_workgroups_per_dimension: {}",
            limits.max_compute_workgroup_storage_size,
            limits.max_compute_invocations_per_workgroup,
            limits.max_compute_workgroups_per_dimension
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
