//! The service and backend maps take the capacity `--bpf-lb-map-max`
//! asks for when they are created, hold more than the compiled-in 65536
//! entries with it, and keep their size once pinned. Needs root and eBPF.

use std::path::PathBuf;

use datapath_svc::{
    bpf::{LoadConfig, Programs, ensure_bpffs},
    maps::{Lb4Key, Lb4Service, names},
    sync::LbMaps as _,
};

struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn capacity(fill: &[(&'static str, u64, u64)], map: &str) -> u64 {
    fill.iter()
        .find(|(name, _, _)| *name == map)
        .map(|(_, _, max)| *max)
        .unwrap_or_else(|| panic!("{map} not reported"))
}

#[test]
fn lb_maps_take_the_configured_capacity_and_keep_it_once_pinned() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (eBPF)"
    );
    let root = PathBuf::from("/sys/fs/bpf");
    ensure_bpffs(&root).expect("bpffs");
    let pins = PinDir(
        root.join("weft")
            .join(format!("mapcap{}", std::process::id())),
    );

    let big = LoadConfig {
        lb_map_max: 131_072,
        ..Default::default()
    };
    let (_progs, mut maps, _counters) = Programs::load(&pins.0, &big).expect("load");
    let fill = maps.fill();
    assert_eq!(capacity(&fill, names::LB4_SERVICES), 131_072);
    assert_eq!(capacity(&fill, names::LB4_BACKENDS), 131_072);
    assert_eq!(
        capacity(&fill, names::LB4_REVERSE_NAT),
        65_536,
        "only the service and backend maps grow"
    );

    // More entries than the default capacity fit.
    for i in 0..70_000u32 {
        let key = Lb4Key {
            address: i.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            ..Default::default()
        };
        maps.set_service(key, Lb4Service::default())
            .unwrap_or_else(|e| panic!("entry {i}: {e}"));
    }
    drop(maps);

    // A restart with the default finds the pinned maps as they were.
    let (_progs, maps, _counters) =
        Programs::load(&pins.0, &LoadConfig::default()).expect("reload");
    let fill = maps.fill();
    assert_eq!(capacity(&fill, names::LB4_SERVICES), 131_072);
    assert_eq!(
        fill.iter()
            .find(|(n, _, _)| *n == names::LB4_SERVICES)
            .map(|(_, entries, _)| *entries),
        Some(70_000)
    );
}
