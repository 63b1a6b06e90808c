//! The RDMA probe: which InfiniBand / RoCE devices this machine has, the
//! state of their ports, and whether a NIC could read GPU memory directly.
//!
//! RDMA lets one machine read or write another's registered memory without
//! the remote CPU taking part (module 4 moves KV blocks that way). The
//! questions a user needs answered before module 4:
//!
//! * is there a device at all, and is its port `ACTIVE`? A port that is
//!   `DOWN` or `INIT` has no link, or no subnet manager (InfiniBand);
//! * which link layer: InfiniBand, or Ethernet (RoCE) — RoCE needs the right
//!   GID index (RoCE v2 routes over IP);
//! * GPUDirect RDMA: can the NIC read GPU memory itself, or must the KV cache
//!   be staged through host memory first? That needs the `nvidia_peermem`
//!   kernel module, or dma-buf export from NVIDIA's open kernel module.
//!
//! Device, port and GID facts come from libibverbs (`ibv_query_port`, the
//! calls `ibv_devinfo` makes); the link rate and the GPUDirect evidence come
//! from `/sys`, where the kernel publishes them.

use std::ffi::CStr;
use std::path::Path;

use ibverbs_sys as ffi;
use serde::{Deserialize, Serialize};

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdmaPort {
    pub port: u8,
    /// `ACTIVE`, `DOWN`, `INIT`, `ARMED`.
    pub state: String,
    /// `InfiniBand` or `Ethernet` (RoCE).
    pub link_layer: String,
    pub active_mtu: u32,
    /// As the kernel words it, e.g. `400 Gb/sec (4X NDR)`.
    pub rate: Option<String>,
    /// GID 0, the port's address on the fabric.
    pub gid0: Option<String>,
    /// First GID index of type RoCE v2 (what an IP-routed RoCE connection uses).
    pub roce_v2_gid_index: Option<u32>,
}

impl RdmaPort {
    pub fn is_active(&self) -> bool {
        self.state == "ACTIVE"
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdmaDevice {
    pub name: String,
    pub firmware: Option<String>,
    pub ports: Vec<RdmaPort>,
}

/// Evidence that the NIC can read and write GPU memory directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuDirect {
    /// `nvidia_peermem` (or the older `nv_peer_mem`) is loaded.
    pub peermem_loaded: bool,
    /// NVIDIA's open kernel module is loaded: it can export GPU memory as
    /// dma-buf, which `ibv_reg_dmabuf_mr` registers without peermem.
    pub nvidia_open_module: bool,
}

impl GpuDirect {
    pub fn ready(&self) -> bool {
        self.peermem_loaded || self.nvidia_open_module
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdmaProbe {
    pub devices: Vec<RdmaDevice>,
    /// Why there are no devices, when there are none.
    pub missing: Option<String>,
    pub gpudirect: GpuDirect,
}

impl RdmaProbe {
    /// Every port that is up, with its device's name.
    pub fn active_ports(&self) -> impl Iterator<Item = (&str, &RdmaPort)> {
        self.devices.iter().flat_map(|d| {
            d.ports
                .iter()
                .filter(|p| p.is_active())
                .map(move |p| (d.name.as_str(), p))
        })
    }
}

/// Asks libibverbs and `/sys`. Never fails: no device is a result.
pub fn probe() -> RdmaProbe {
    let gpudirect = GpuDirect {
        peermem_loaded: Path::new("/sys/module/nvidia_peermem").exists()
            || Path::new("/sys/module/nv_peer_mem").exists(),
        nvidia_open_module: std::fs::read_to_string("/proc/driver/nvidia/version")
            .map(|v| v.contains("Open Kernel Module"))
            .unwrap_or(false),
    };
    let (devices, missing) = match list_devices() {
        Ok(devices) if devices.is_empty() => (devices, Some(why_no_devices())),
        Ok(devices) => (devices, None),
        Err(e) => (Vec::new(), Some(explain_error(&e))),
    };
    RdmaProbe {
        devices,
        missing,
        gpudirect,
    }
}

fn explain_error(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(38) => "this kernel has no RDMA support (ibv_get_device_list: ENOSYS)".into(),
        Some(1) | Some(13) => {
            format!("not allowed to open RDMA devices ({e}); check /dev/infiniband permissions")
        }
        _ => format!("libibverbs could not list devices: {e}"),
    }
}

/// libibverbs lists nothing either when there is no hardware, or when the
/// kernel has devices but the user-space driver ("provider") is missing.
fn why_no_devices() -> String {
    let sysfs = Path::new("/sys/class/infiniband");
    let kernel_devices = std::fs::read_dir(sysfs).map(|d| d.count()).unwrap_or(0);
    if kernel_devices > 0 {
        format!(
            "the kernel has {kernel_devices} RDMA device(s) but libibverbs lists none: \
             install the user-space providers (Debian/Ubuntu: ibverbs-providers)"
        )
    } else {
        "no RDMA device: /sys/class/infiniband is empty or absent".into()
    }
}

fn list_devices() -> std::io::Result<Vec<RdmaDevice>> {
    let mut count = 0;
    // SAFETY: ibv_get_device_list returns an array of `count` device pointers
    // (or null with errno set); it stays valid until ibv_free_device_list.
    let list = unsafe { ffi::ibv_get_device_list(&mut count) };
    if list.is_null() {
        return Err(std::io::Error::last_os_error());
    }
    let pointers = unsafe { std::slice::from_raw_parts(list, count.max(0) as usize) };
    let devices = pointers.iter().map(|&dev| query_device(dev)).collect();
    unsafe { ffi::ibv_free_device_list(list) };
    Ok(devices)
}

fn query_device(dev: *mut ffi::ibv_device) -> RdmaDevice {
    // SAFETY: `dev` comes from the live device list; the name is a C string it owns.
    let name = unsafe { CStr::from_ptr(ffi::ibv_get_device_name(dev)) }
        .to_string_lossy()
        .into_owned();
    let context = unsafe { ffi::ibv_open_device(dev) };
    if context.is_null() {
        return RdmaDevice {
            name,
            firmware: None,
            ports: Vec::new(),
        };
    }
    let mut attr = ffi::ibv_device_attr::default();
    let ok = unsafe { ffi::ibv_query_device(context, &mut attr) } == 0;
    let firmware = ok.then(|| {
        unsafe { CStr::from_ptr(attr.fw_ver.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    });
    let port_count = if ok { attr.phys_port_cnt } else { 0 };
    let ports = (1..=port_count)
        .filter_map(|port| query_port(context, &name, port))
        .collect();
    unsafe { ffi::ibv_close_device(context) };
    RdmaDevice {
        name,
        firmware,
        ports,
    }
}

fn query_port(context: *mut ffi::ibv_context, device: &str, port: u8) -> Option<RdmaPort> {
    let mut attr = ffi::ibv_port_attr::default();
    // SAFETY: the exported ibv_query_port fills the leading, long-stable
    // fields of ibv_port_attr (state … link_layer), which is all we read.
    let rc = unsafe {
        ffi::ibv_query_port(
            context,
            port,
            &mut attr as *mut ffi::ibv_port_attr as *mut _,
        )
    };
    if rc != 0 {
        return None;
    }
    let state = match attr.state {
        ffi::ibv_port_state::IBV_PORT_DOWN => "DOWN",
        ffi::ibv_port_state::IBV_PORT_INIT => "INIT",
        ffi::ibv_port_state::IBV_PORT_ARMED => "ARMED",
        ffi::ibv_port_state::IBV_PORT_ACTIVE => "ACTIVE",
        ffi::ibv_port_state::IBV_PORT_ACTIVE_DEFER => "ACTIVE_DEFER",
        _ => "NOP",
    };
    let link_layer = match attr.link_layer as u32 {
        ffi::IBV_LINK_LAYER_ETHERNET => "Ethernet",
        _ => "InfiniBand",
    };
    let mut gid = ffi::ibv_gid::default();
    let gid0 = (unsafe { ffi::ibv_query_gid(context, port, 0, &mut gid) } == 0)
        .then(|| format_gid(unsafe { &gid.raw }));
    let roce_v2_gid_index = (0..attr.gid_tbl_len.max(0) as u32).find(|&index| {
        let mut entry = ffi::ibv_gid_entry::default();
        let size = std::mem::size_of::<ffi::ibv_gid_entry>();
        let rc =
            unsafe { ffi::_ibv_query_gid_ex(context, port as u32, index, &mut entry, 0, size) };
        rc == 0 && entry.gid_type == ffi::IBV_GID_TYPE_ROCE_V2
    });
    Some(RdmaPort {
        port,
        state: state.to_string(),
        link_layer: link_layer.to_string(),
        active_mtu: mtu_bytes(attr.active_mtu),
        rate: std::fs::read_to_string(format!("/sys/class/infiniband/{device}/ports/{port}/rate"))
            .ok()
            .map(|r| r.trim().to_string()),
        gid0,
        roce_v2_gid_index,
    })
}

fn mtu_bytes(mtu: ffi::ibv_mtu) -> u32 {
    match mtu {
        ffi::IBV_MTU_256 => 256,
        ffi::IBV_MTU_512 => 512,
        ffi::IBV_MTU_1024 => 1024,
        ffi::IBV_MTU_2048 => 2048,
        ffi::IBV_MTU_4096 => 4096,
        _ => 0,
    }
}

/// A GID is 16 bytes, written like an IPv6 address (`fe80:0000:…`).
fn format_gid(raw: &[u8; 16]) -> String {
    raw.chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_print_like_ipv6() {
        let mut raw = [0u8; 16];
        raw[0] = 0xfe;
        raw[1] = 0x80;
        raw[15] = 0x01;
        assert_eq!(format_gid(&raw), "fe80:0000:0000:0000:0000:0000:0000:0001");
    }

    #[test]
    fn probe_answers_without_hardware() {
        let probe = probe();
        // With devices, each has a name; without, the report says why.
        assert!(probe.devices.iter().all(|d| !d.name.is_empty()));
        assert_eq!(probe.devices.is_empty(), probe.missing.is_some());
    }
}
