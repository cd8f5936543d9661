//! `ferry devices`: the wgpu adapters found, with backend and limits.

use anyhow::Result;

use crate::args::DevicesArgs;

pub fn run(args: DevicesArgs) -> Result<()> {
    let adapters = ferry_runtime::device::list_adapters();
    if args.json {
        println!("{}", serde_json::to_string(&adapters)?);
        return Ok(());
    }
    if adapters.is_empty() {
        println!("no wgpu adapters found (on Debian without a GPU: apt-get install mesa-vulkan-drivers)");
    }
    for (i, a) in adapters.iter().enumerate() {
        println!(
            "{i}: {} [{} {}] driver {:?}, shader-f16 {}, max storage binding {} MiB, max buffer {} MiB",
            a.name,
            a.backend,
            a.device_type,
            a.driver,
            a.shader_f16,
            a.max_storage_buffer_binding_size >> 20,
            a.max_buffer_size >> 20
        );
    }
    Ok(())
}
