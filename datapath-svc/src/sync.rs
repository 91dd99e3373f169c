//! Keeps the load-balancer maps equal to the desired frontends.
//!
//! `LbSync` remembers what it wrote; at start it reads that back from the
//! (pinned, still forwarding) maps instead of flushing them, so a restart
//! changes nothing a packet can notice. Every change is ordered so that a
//! packet looking the maps up at any instant finds a consistent frontend:
//! backends before the slots that name them, slots before the master entry
//! that counts them, and removals in the reverse order.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::{
    lb::{Algorithm, Backend, Frontend, FrontendKind, FrontendSpec, Proto, Scope},
    maglev,
    maps::{
        Lb4Backend, Lb4Key, Lb4MaglevBlock, Lb4MaglevKey, Lb4ReverseNat, Lb4Service, MAGLEV_BLOCK,
        addr_from_be, backend_flags, be_addr, be_port, port_from_be, svc_flags, svc_flags2,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("writing map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error("no free {0} id left")]
    IdsExhausted(&'static str),
}

pub type Result<T, E = SyncError> = std::result::Result<T, E>;

/// The three load-balancer maps, as `LbSync` uses them. The kernel maps
/// implement it in `bpf.rs`; `MemMaps` implements it for tests.
pub trait LbMaps {
    fn set_service(&mut self, key: Lb4Key, value: Lb4Service) -> Result<()>;
    fn del_service(&mut self, key: Lb4Key) -> Result<()>;
    fn set_backend(&mut self, id: u32, value: Lb4Backend) -> Result<()>;
    fn del_backend(&mut self, id: u32) -> Result<()>;
    fn set_rev_nat(&mut self, id: u16, value: Lb4ReverseNat) -> Result<()>;
    fn del_rev_nat(&mut self, id: u16) -> Result<()>;
    fn set_maglev(&mut self, key: Lb4MaglevKey, value: Lb4MaglevBlock) -> Result<()>;
    fn del_maglev(&mut self, key: Lb4MaglevKey) -> Result<()>;
    fn services(&self) -> Result<Vec<(Lb4Key, Lb4Service)>>;
    fn backends(&self) -> Result<Vec<(u32, Lb4Backend)>>;
    fn rev_nats(&self) -> Result<Vec<(u16, Lb4ReverseNat)>>;
    fn maglev(&self) -> Result<Vec<(Lb4MaglevKey, Lb4MaglevBlock)>>;
}

/// How Maglev tables are built; the same on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevConfig {
    /// The table size, a prime.
    pub m: u32,
    pub seed: u32,
}

impl Default for MaglevConfig {
    fn default() -> Self {
        Self { m: 16381, seed: 0 }
    }
}

/// What is programmed for one frontend.
#[derive(Debug, Clone)]
pub struct Programmed {
    pub rev_nat: u16,
    pub kind: FrontendKind,
    /// The master entry as written (count, flags, algorithm, affinity).
    pub master: Lb4Service,
    /// Backend ids in slot order (slot 1 first); 0 marks a missing slot.
    /// May run past `count` when restored from an interrupted update.
    pub slots: Vec<u32>,
    /// Every backend the frontend holds a reference on (selectable or not).
    pub backends: Vec<Backend>,
    /// The Service the frontend belongs to; empty when restored from the
    /// maps and not yet confirmed by the desired state.
    pub service: String,
    /// The Maglev table as written; empty when the frontend has none (or it
    /// was restored from the maps, and will be rewritten).
    pub maglev: Vec<u32>,
}

impl Programmed {
    pub fn algorithm(&self) -> Algorithm {
        Algorithm::from_number(self.master.algorithm)
    }

    pub fn affinity_timeout(&self) -> Option<u32> {
        (self.master.flags & svc_flags::AFFINITY != 0).then_some(self.master.affinity_timeout)
    }
}

#[derive(Debug, Clone, Copy)]
struct BackendEntry {
    id: u32,
    flags: u8,
    refs: u32,
}

pub struct LbSync<M> {
    maps: M,
    maglev: MaglevConfig,
    frontends: BTreeMap<Frontend, Programmed>,
    backends: HashMap<Backend, BackendEntry>,
    /// Backend ids in use: a set, not an id-to-backend map, because at
    /// 100,000 backends every byte per entry is 130 KiB of resident memory.
    backend_ids: HashSet<u32>,
    rev_nat_ids: HashMap<u16, Frontend>,
    next_backend_id: u32,
    next_rev_nat: u16,
}

fn master_key(f: &Frontend, slot: u16) -> Lb4Key {
    Lb4Key {
        address: be_addr(f.addr),
        dport: be_port(f.port),
        backend_slot: slot,
        proto: f.proto.number(),
        scope: f.scope.number(),
        ..Default::default()
    }
}

/// The master entry's second flags byte for `spec`.
fn master_flags2(spec: &FrontendSpec) -> u8 {
    let mut flags2 = 0;
    if spec.internal_scope {
        flags2 |= svc_flags2::TWO_SCOPES;
    }
    if spec.endpoints_elsewhere {
        flags2 |= svc_flags2::ENDPOINTS_ELSEWHERE;
    }
    flags2
}

impl<M: LbMaps> LbSync<M> {
    /// Adopts whatever the maps hold now.
    pub fn restore(maps: M, maglev: MaglevConfig) -> Result<Self> {
        let mut s = Self {
            maglev,
            frontends: BTreeMap::new(),
            backends: HashMap::new(),
            backend_ids: HashSet::new(),
            rev_nat_ids: HashMap::new(),
            next_backend_id: 1,
            next_rev_nat: 1,
            maps,
        };
        let mut by_id: HashMap<u32, Backend> = HashMap::new();
        for (id, b) in s.maps.backends()? {
            let Some(proto) = Proto::from_number(b.proto) else {
                continue;
            };
            let backend = Backend {
                addr: addr_from_be(b.address),
                port: port_from_be(b.port),
                proto,
            };
            s.backends.insert(
                backend,
                BackendEntry {
                    id,
                    flags: b.flags,
                    refs: 0,
                },
            );
            s.backend_ids.insert(id);
            by_id.insert(id, backend);
            s.next_backend_id = s.next_backend_id.max(id.wrapping_add(1).max(1));
        }
        let mut slots: BTreeMap<Frontend, BTreeMap<u16, u32>> = BTreeMap::new();
        for (key, value) in s.maps.services()? {
            let (Some(proto), Some(scope)) =
                (Proto::from_number(key.proto), Scope::from_number(key.scope))
            else {
                continue;
            };
            let f = Frontend {
                addr: addr_from_be(key.address),
                port: port_from_be(key.dport),
                proto,
                scope,
            };
            if key.backend_slot == 0 {
                s.frontends.insert(
                    f,
                    Programmed {
                        rev_nat: value.rev_nat_index,
                        kind: FrontendKind::from_flags(value.flags),
                        master: value,
                        slots: Vec::new(),
                        backends: Vec::new(),
                        service: String::new(),
                        maglev: Vec::new(),
                    },
                );
                s.rev_nat_ids.insert(value.rev_nat_index, f);
                s.next_rev_nat = s
                    .next_rev_nat
                    .max(value.rev_nat_index.wrapping_add(1).max(1));
            } else {
                slots
                    .entry(f)
                    .or_default()
                    .insert(key.backend_slot, value.backend_id);
            }
        }
        for (f, by_slot) in slots {
            match s.frontends.get_mut(&f) {
                Some(p) => {
                    let last = by_slot.keys().next_back().copied().unwrap_or(0);
                    p.slots = (1..=last)
                        .map(|i| by_slot.get(&i).copied().unwrap_or(0))
                        .collect();
                    for id in &p.slots {
                        if let Some(b) = by_id.get(id) {
                            p.backends.push(*b);
                            if let Some(e) = s.backends.get_mut(b) {
                                e.refs += 1;
                            }
                        }
                    }
                }
                // Slots without a master are debris of an interrupted removal.
                None => {
                    for slot in by_slot.keys() {
                        s.maps.del_service(master_key(&f, *slot))?;
                    }
                }
            }
        }
        for (id, _) in s.maps.rev_nats()? {
            if !s.rev_nat_ids.contains_key(&id) {
                s.maps.del_rev_nat(id)?;
            }
        }
        // Maglev tables: adopted where they belong to a Maglev frontend (so
        // the next update writes only what differs), removed where the
        // frontend is gone, uses Maglev no more, or the table size changed.
        let blocks = s.maglev_blocks();
        let m = s.maglev.m as usize;
        for (key, value) in s.maps.maglev()? {
            let owner = s
                .rev_nat_ids
                .get(&key.rev_nat_index)
                .and_then(|f| s.frontends.get_mut(f))
                .filter(|p| p.algorithm() == Algorithm::Maglev && key.block < blocks);
            match owner {
                Some(p) => {
                    p.maglev.resize(m, 0);
                    let start = key.block as usize * MAGLEV_BLOCK;
                    let end = (start + MAGLEV_BLOCK).min(m);
                    p.maglev[start..end].copy_from_slice(&value.backend_ids[..end - start]);
                }
                None => s.maps.del_maglev(key)?,
            }
        }
        Ok(s)
    }

    pub fn programmed(&self) -> &BTreeMap<Frontend, Programmed> {
        &self.frontends
    }

    /// The id and state of a programmed backend.
    pub fn backend(&self, b: &Backend) -> Option<(u32, bool)> {
        self.backends
            .get(b)
            .map(|e| (e.id, e.flags & backend_flags::TERMINATING != 0))
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Programs one frontend (`Some`) or removes it (`None`).
    pub fn apply(&mut self, f: Frontend, spec: Option<&FrontendSpec>) -> Result<()> {
        match spec {
            Some(spec) => self.program(f, spec),
            None => self.remove(f),
        }
    }

    /// Removes every programmed frontend for which `keep` is false.
    pub fn retain(&mut self, keep: impl Fn(&Frontend) -> bool) -> Result<()> {
        let gone: Vec<Frontend> = self
            .frontends
            .keys()
            .filter(|f| !keep(f))
            .copied()
            .collect();
        for f in gone {
            self.remove(f)?;
        }
        // Backends restored from the maps that no frontend references.
        let orphans: Vec<Backend> = self
            .backends
            .iter()
            .filter(|(_, e)| e.refs == 0)
            .map(|(b, _)| *b)
            .collect();
        for b in orphans {
            self.drop_backend(b)?;
        }
        Ok(())
    }

    fn program(&mut self, f: Frontend, spec: &FrontendSpec) -> Result<()> {
        // 1. Every backend exists, with its current state.
        for b in &spec.backends {
            let mut flags = 0;
            if b.terminating {
                flags |= backend_flags::TERMINATING;
            }
            if b.local {
                flags |= backend_flags::LOCAL;
            }
            self.ensure_backend(b.backend, flags)?;
        }
        // 2. The reverse-NAT entry.
        let rev_nat = match self.frontends.get(&f) {
            Some(p) => p.rev_nat,
            None => {
                let id = self.alloc_rev_nat()?;
                self.maps.set_rev_nat(
                    id,
                    Lb4ReverseNat {
                        address: be_addr(f.addr),
                        port: be_port(f.port),
                        pad: 0,
                    },
                )?;
                self.rev_nat_ids.insert(id, f);
                id
            }
        };
        let mut flags = spec.kind.flags();
        if spec.affinity_timeout.is_some() {
            flags |= svc_flags::AFFINITY;
        }
        if spec.terminating_only() {
            flags |= svc_flags::TERMINATING_ONLY;
        }
        let new_slots: Vec<u32> = spec
            .selectable()
            .filter_map(|b| self.backends.get(b).map(|e| e.id))
            .collect();
        let old = self.frontends.get(&f).cloned();
        let old_slots = old.as_ref().map(|p| p.slots.as_slice()).unwrap_or(&[]);
        let count = u16::try_from(new_slots.len()).map_err(|_| SyncError::Map {
            map: "weft_lb4_services",
            message: format!("{f} has more than 65535 backends"),
        })?;
        // 3. Slots that changed.
        for (i, id) in new_slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                let value = Lb4Service {
                    backend_id: *id,
                    rev_nat_index: rev_nat,
                    ..Default::default()
                };
                self.maps.set_service(master_key(&f, i as u16 + 1), value)?;
            }
        }
        // 4. The Maglev table, before the master entry points lookups at it.
        let old_table = old.as_ref().map(|p| p.maglev.as_slice()).unwrap_or(&[]);
        let table = match spec.algorithm {
            Algorithm::Maglev => {
                let named: Vec<(String, u32)> = spec
                    .selectable()
                    .filter_map(|b| {
                        self.backends
                            .get(b)
                            .map(|e| (format!("{}:{}", b.addr, b.port), e.id))
                    })
                    .collect();
                let table = maglev::table(&named, self.maglev.m, self.maglev.seed);
                if table.is_empty() && !old_table.is_empty() {
                    // No backend left: lookups fall through to "no backend".
                    self.delete_maglev(rev_nat)?;
                }
                self.write_maglev(rev_nat, old_table, &table)?;
                table
            }
            Algorithm::Random => {
                if old
                    .as_ref()
                    .is_some_and(|p| p.algorithm() == Algorithm::Maglev)
                {
                    self.delete_maglev(rev_nat)?;
                }
                Vec::new()
            }
        };
        // 5. The master entry, which makes the new slots visible.
        let master = Lb4Service {
            backend_id: 0,
            count,
            rev_nat_index: rev_nat,
            flags,
            algorithm: spec.algorithm.number(),
            flags2: master_flags2(spec),
            pad: 0,
            affinity_timeout: spec.affinity_timeout.unwrap_or(0),
        };
        if old.as_ref().map(|p| p.master) != Some(master) {
            self.maps.set_service(master_key(&f, 0), master)?;
        }
        // 6. Slots past the new count.
        for slot in new_slots.len()..old_slots.len() {
            self.maps.del_service(master_key(&f, slot as u16 + 1))?;
        }
        // 7. References: take the new ones, drop the old ones.
        let new_backends: Vec<Backend> = spec.backends.iter().map(|b| b.backend).collect();
        for b in &new_backends {
            if let Some(e) = self.backends.get_mut(b) {
                e.refs += 1;
            }
        }
        self.frontends.insert(
            f,
            Programmed {
                rev_nat,
                kind: spec.kind,
                master,
                slots: new_slots,
                backends: new_backends,
                service: spec.service.clone(),
                maglev: table,
            },
        );
        if let Some(old) = old {
            self.release(&old.backends)?;
        }
        Ok(())
    }

    fn remove(&mut self, f: Frontend) -> Result<()> {
        let Some(p) = self.frontends.get(&f).cloned() else {
            return Ok(());
        };
        self.maps.del_service(master_key(&f, 0))?;
        for slot in 1..=p.slots.len() {
            self.maps.del_service(master_key(&f, slot as u16))?;
        }
        if p.algorithm() == Algorithm::Maglev {
            self.delete_maglev(p.rev_nat)?;
        }
        self.maps.del_rev_nat(p.rev_nat)?;
        self.rev_nat_ids.remove(&p.rev_nat);
        self.frontends.remove(&f);
        self.release(&p.backends)
    }

    fn maglev_blocks(&self) -> u32 {
        self.maglev.m.div_ceil(MAGLEV_BLOCK as u32)
    }

    /// Writes the blocks of a Maglev table that differ from `old`.
    fn write_maglev(&mut self, rev_nat: u16, old: &[u32], table: &[u32]) -> Result<()> {
        for (block, chunk) in table.chunks(MAGLEV_BLOCK).enumerate() {
            let start = block * MAGLEV_BLOCK;
            if old.get(start..start + chunk.len()) == Some(chunk) {
                continue;
            }
            let mut value = Lb4MaglevBlock {
                backend_ids: [0; MAGLEV_BLOCK],
            };
            value.backend_ids[..chunk.len()].copy_from_slice(chunk);
            let key = Lb4MaglevKey {
                rev_nat_index: rev_nat,
                pad: 0,
                block: block as u32,
            };
            self.maps.set_maglev(key, value)?;
        }
        Ok(())
    }

    fn delete_maglev(&mut self, rev_nat: u16) -> Result<()> {
        for block in 0..self.maglev_blocks() {
            self.maps.del_maglev(Lb4MaglevKey {
                rev_nat_index: rev_nat,
                pad: 0,
                block,
            })?;
        }
        Ok(())
    }

    fn release(&mut self, backends: &[Backend]) -> Result<()> {
        for b in backends {
            let drop = match self.backends.get_mut(b) {
                Some(e) => {
                    e.refs = e.refs.saturating_sub(1);
                    e.refs == 0
                }
                None => false,
            };
            if drop {
                self.drop_backend(*b)?;
            }
        }
        Ok(())
    }

    fn drop_backend(&mut self, b: Backend) -> Result<()> {
        if let Some(e) = self.backends.get(&b) {
            self.maps.del_backend(e.id)?;
            self.backend_ids.remove(&e.id);
            self.backends.remove(&b);
        }
        Ok(())
    }

    fn ensure_backend(&mut self, b: Backend, flags: u8) -> Result<()> {
        let value = |flags| Lb4Backend {
            address: be_addr(b.addr),
            port: be_port(b.port),
            proto: b.proto.number(),
            flags,
        };
        match self.backends.get_mut(&b) {
            Some(e) if e.flags == flags => Ok(()),
            Some(e) => {
                let id = e.id;
                e.flags = flags;
                self.maps.set_backend(id, value(flags))
            }
            None => {
                let id = self.alloc_backend_id()?;
                self.maps.set_backend(id, value(flags))?;
                self.backends.insert(b, BackendEntry { id, flags, refs: 0 });
                self.backend_ids.insert(id);
                Ok(())
            }
        }
    }

    /// Ids grow monotonically (wrapping, skipping ones in use) so that a
    /// removed backend's id is not soon given to another backend while
    /// connection-tracking entries may still name it.
    fn alloc_backend_id(&mut self) -> Result<u32> {
        for _ in 0..=self.backend_ids.len() {
            let id = self.next_backend_id;
            self.next_backend_id = id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.backend_ids.contains(&id) {
                return Ok(id);
            }
        }
        Err(SyncError::IdsExhausted("backend"))
    }

    fn alloc_rev_nat(&mut self) -> Result<u16> {
        for _ in 0..=u16::MAX {
            let id = self.next_rev_nat;
            self.next_rev_nat = id.checked_add(1).unwrap_or(1);
            if id != 0 && !self.rev_nat_ids.contains_key(&id) {
                return Ok(id);
            }
        }
        Err(SyncError::IdsExhausted("reverse-NAT"))
    }
}

/// In-memory maps, for tests of the ordering and bookkeeping above.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemMaps {
    pub services: BTreeMap<Lb4Key, Lb4Service>,
    pub backends: BTreeMap<u32, Lb4Backend>,
    pub rev_nats: BTreeMap<u16, Lb4ReverseNat>,
    pub maglev: BTreeMap<Lb4MaglevKey, Lb4MaglevBlock>,
}

impl LbMaps for MemMaps {
    fn set_service(&mut self, key: Lb4Key, value: Lb4Service) -> Result<()> {
        self.services.insert(key, value);
        Ok(())
    }
    fn del_service(&mut self, key: Lb4Key) -> Result<()> {
        self.services.remove(&key);
        Ok(())
    }
    fn set_backend(&mut self, id: u32, value: Lb4Backend) -> Result<()> {
        self.backends.insert(id, value);
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<()> {
        self.backends.remove(&id);
        Ok(())
    }
    fn set_rev_nat(&mut self, id: u16, value: Lb4ReverseNat) -> Result<()> {
        self.rev_nats.insert(id, value);
        Ok(())
    }
    fn del_rev_nat(&mut self, id: u16) -> Result<()> {
        self.rev_nats.remove(&id);
        Ok(())
    }
    fn set_maglev(&mut self, key: Lb4MaglevKey, value: Lb4MaglevBlock) -> Result<()> {
        self.maglev.insert(key, value);
        Ok(())
    }
    fn del_maglev(&mut self, key: Lb4MaglevKey) -> Result<()> {
        self.maglev.remove(&key);
        Ok(())
    }
    fn maglev(&self) -> Result<Vec<(Lb4MaglevKey, Lb4MaglevBlock)>> {
        Ok(self.maglev.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn services(&self) -> Result<Vec<(Lb4Key, Lb4Service)>> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Lb4Backend)>> {
        Ok(self.backends.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn rev_nats(&self) -> Result<Vec<(u16, Lb4ReverseNat)>> {
        Ok(self.rev_nats.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

/// Checks that `maps` hold exactly `desired`: every frontend's master and
/// slots name existing backends with the right addresses, nothing else is
/// there. Used by tests here and by the end-to-end tests on kernel maps.
pub fn verify<M: LbMaps>(
    maps: &M,
    desired: &BTreeMap<Frontend, FrontendSpec>,
    maglev_config: MaglevConfig,
) -> Result<(), String> {
    let services: BTreeMap<Lb4Key, Lb4Service> = maps
        .services()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let backends: BTreeMap<u32, Lb4Backend> = maps
        .backends()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let rev_nats: BTreeMap<u16, Lb4ReverseNat> = maps
        .rev_nats()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let tables: BTreeMap<Lb4MaglevKey, Lb4MaglevBlock> = maps
        .maglev()
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let mut expected_entries = 0;
    let mut expected_blocks = 0;
    for (f, spec) in desired {
        let master = services
            .get(&master_key(f, 0))
            .ok_or(format!("{f}: no master entry"))?;
        let mut want: Vec<Backend> = spec.selectable().copied().collect();
        want.sort();
        if master.count as usize != want.len() {
            return Err(format!(
                "{f}: count {} but {} selectable backends",
                master.count,
                want.len()
            ));
        }
        let rn = rev_nats
            .get(&master.rev_nat_index)
            .ok_or(format!("{f}: no reverse-NAT entry"))?;
        if addr_from_be(rn.address) != f.addr || port_from_be(rn.port) != f.port {
            return Err(format!("{f}: reverse-NAT entry names another frontend"));
        }
        let mut got = Vec::new();
        for slot in 1..=master.count {
            let s = services
                .get(&master_key(f, slot))
                .ok_or(format!("{f}: slot {slot} missing"))?;
            let b = backends
                .get(&s.backend_id)
                .ok_or(format!("{f}: slot {slot} names a missing backend"))?;
            let proto =
                Proto::from_number(b.proto).ok_or(format!("{f}: backend protocol {}", b.proto))?;
            got.push(Backend {
                addr: addr_from_be(b.address),
                port: port_from_be(b.port),
                proto,
            });
        }
        got.sort();
        if got != want {
            return Err(format!("{f}: backends {got:?}, want {want:?}"));
        }
        if master.algorithm != spec.algorithm.number()
            || master.affinity_timeout != spec.affinity_timeout.unwrap_or(0)
            || (master.flags & svc_flags::AFFINITY != 0) != spec.affinity_timeout.is_some()
            || (master.flags & svc_flags::TERMINATING_ONLY != 0) != spec.terminating_only()
            || master.flags2 != master_flags2(spec)
        {
            return Err(format!(
                "{f}: master entry {master:?} does not match {spec:?}"
            ));
        }
        if spec.algorithm == Algorithm::Maglev {
            let named: Vec<(String, u32)> = (1..=master.count)
                .filter_map(|slot| services.get(&master_key(f, slot)))
                .filter_map(|s| {
                    let b = backends.get(&s.backend_id)?;
                    Some((
                        format!("{}:{}", addr_from_be(b.address), port_from_be(b.port)),
                        s.backend_id,
                    ))
                })
                .collect();
            let want = maglev::table(&named, maglev_config.m, maglev_config.seed);
            let blocks = if want.is_empty() {
                0
            } else {
                maglev_config.m.div_ceil(MAGLEV_BLOCK as u32)
            };
            let mut got = Vec::with_capacity(maglev_config.m as usize);
            for block in 0..blocks {
                let key = Lb4MaglevKey {
                    rev_nat_index: master.rev_nat_index,
                    pad: 0,
                    block,
                };
                let b = tables
                    .get(&key)
                    .ok_or(format!("{f}: Maglev block {block} missing"))?;
                got.extend_from_slice(&b.backend_ids);
            }
            got.truncate(maglev_config.m as usize);
            if got != want {
                return Err(format!("{f}: the Maglev table differs from the backends"));
            }
            expected_blocks += blocks as usize;
        }
        expected_entries += 1 + master.count as usize;
    }
    if services.len() != expected_entries {
        return Err(format!(
            "{} service entries, want {expected_entries}",
            services.len()
        ));
    }
    if tables.len() != expected_blocks {
        return Err(format!(
            "{} Maglev blocks, want {expected_blocks}",
            tables.len()
        ));
    }
    if rev_nats.len() != desired.len() {
        return Err(format!(
            "{} reverse-NAT entries, want {}",
            rev_nats.len(),
            desired.len()
        ));
    }
    let referenced: std::collections::BTreeSet<Backend> = desired
        .values()
        .flat_map(|s| s.backends.iter().map(|b| b.backend))
        .collect();
    if backends.len() != referenced.len() {
        return Err(format!(
            "{} backends, want {}",
            backends.len(),
            referenced.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::BackendSpec;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const CFG: MaglevConfig = MaglevConfig { m: 251, seed: 9 };

    fn fe(i: u8) -> Frontend {
        Frontend {
            addr: Ipv4Addr::new(10, 96, 0, i),
            port: 80,
            proto: Proto::Tcp,
            scope: Scope::External,
        }
    }

    fn internal(i: u8) -> Frontend {
        Frontend {
            scope: Scope::Internal,
            ..fe(i)
        }
    }

    fn spec_with(
        backends: &[(u8, bool)],
        algorithm: Algorithm,
        affinity: Option<u32>,
    ) -> FrontendSpec {
        FrontendSpec {
            service: "default/web".into(),
            kind: FrontendKind::ClusterIp,
            backends: backends
                .iter()
                .map(|(i, t)| BackendSpec {
                    backend: Backend {
                        addr: Ipv4Addr::new(10, 244, 0, *i),
                        port: 8080,
                        proto: Proto::Tcp,
                    },
                    terminating: *t,
                    local: i % 2 == 0,
                })
                .collect(),
            algorithm,
            affinity_timeout: affinity,
            internal_scope: false,
            endpoints_elsewhere: false,
        }
    }

    fn spec(backends: &[(u8, bool)]) -> FrontendSpec {
        spec_with(backends, Algorithm::Random, None)
    }

    fn fresh() -> LbSync<MemMaps> {
        LbSync::restore(MemMaps::default(), CFG).expect("restore")
    }

    #[test]
    fn shrinking_removes_slots_and_unused_backends() {
        let mut s = fresh();
        s.apply(fe(1), Some(&spec(&[(1, false), (2, false), (3, false)])))
            .expect("apply");
        assert_eq!(s.maps().services.len(), 4);
        s.apply(fe(1), Some(&spec(&[(1, false)]))).expect("apply");
        assert_eq!(s.maps().services.len(), 2);
        assert_eq!(s.maps().backends.len(), 1);
        s.apply(fe(1), None).expect("remove");
        assert_eq!(s.maps(), &MemMaps::default());
    }

    #[test]
    fn terminating_backends_stay_but_are_not_selectable() {
        let mut s = fresh();
        let d = spec(&[(1, false), (2, true)]);
        s.apply(fe(1), Some(&d)).expect("apply");
        assert_eq!(s.maps().backends.len(), 2);
        let master = s.maps().services[&master_key(&fe(1), 0)];
        assert_eq!(master.count, 1);
        verify(s.maps(), &BTreeMap::from([(fe(1), d)]), CFG).expect("maps match");
    }

    #[test]
    fn maglev_frontends_get_a_table_and_lose_it_with_the_algorithm() {
        let mut s = fresh();
        let d = spec_with(
            &[(1, false), (2, false), (3, false)],
            Algorithm::Maglev,
            Some(60),
        );
        s.apply(fe(1), Some(&d)).expect("apply");
        assert_eq!(s.maps().maglev.len(), 251usize.div_ceil(MAGLEV_BLOCK));
        verify(s.maps(), &BTreeMap::from([(fe(1), d)]), CFG).expect("maps match");
        let local = s
            .maps()
            .backends
            .values()
            .filter(|b| b.flags & backend_flags::LOCAL != 0)
            .count();
        assert_eq!(local, 1, "the locality of each backend is written");
        let d = spec(&[(1, false)]);
        s.apply(fe(1), Some(&d)).expect("apply");
        assert!(s.maps().maglev.is_empty());
        verify(s.maps(), &BTreeMap::from([(fe(1), d)]), CFG).expect("maps match");
    }

    #[test]
    fn an_internal_scope_is_a_frontend_of_its_own() {
        let mut s = fresh();
        let external = FrontendSpec {
            internal_scope: true,
            endpoints_elsewhere: true,
            ..spec(&[])
        };
        let everyone = spec_with(&[(1, false), (2, false)], Algorithm::Maglev, None);
        let desired = BTreeMap::from([(fe(1), external.clone()), (internal(1), everyone)]);
        for (f, d) in &desired {
            s.apply(*f, Some(d)).expect("apply");
        }
        verify(s.maps(), &desired, CFG).expect("maps match");
        let master = s.maps().services[&master_key(&fe(1), 0)];
        assert_eq!(master.count, 0);
        assert_eq!(
            master.flags2,
            svc_flags2::TWO_SCOPES | svc_flags2::ENDPOINTS_ELSEWHERE
        );
        let inner = s.maps().services[&master_key(&internal(1), 0)];
        assert_eq!((inner.count, inner.flags2), (2, 0));
        assert_ne!(
            master.rev_nat_index, inner.rev_nat_index,
            "each scope has its own Maglev table and affinity"
        );

        let again = LbSync::restore(s.maps().clone(), CFG).expect("restore");
        assert_eq!(
            again.programmed().keys().copied().collect::<Vec<_>>(),
            vec![fe(1), internal(1)],
            "both scopes are adopted"
        );
        s.apply(internal(1), None).expect("remove");
        s.apply(fe(1), Some(&spec(&[(1, false)]))).expect("apply");
        verify(
            s.maps(),
            &BTreeMap::from([(fe(1), spec(&[(1, false)]))]),
            CFG,
        )
        .expect("maps match");
    }

    #[test]
    fn a_restart_adopts_the_maps_without_rewriting_them() {
        let mut s = fresh();
        let d = spec(&[(1, false), (2, false)]);
        s.apply(fe(1), Some(&d)).expect("apply");
        let before = s.maps().clone();
        let mut again = LbSync::restore(before.clone(), CFG).expect("restore");
        again.apply(fe(1), Some(&d)).expect("apply");
        again.retain(|f| *f == fe(1)).expect("retain");
        assert_eq!(again.maps(), &before, "same desired state, same maps");
    }

    fn arb_spec() -> impl Strategy<Value = FrontendSpec> {
        (
            proptest::collection::vec((1u8..12, any::<bool>()), 0..6),
            any::<bool>(),
            proptest::option::of(1u32..100),
            any::<(bool, bool)>(),
        )
            .prop_map(|(mut bs, maglev, affinity, (two_scopes, elsewhere))| {
                bs.sort();
                bs.dedup_by_key(|b| b.0);
                let alg = if maglev {
                    Algorithm::Maglev
                } else {
                    Algorithm::Random
                };
                FrontendSpec {
                    internal_scope: two_scopes,
                    endpoints_elsewhere: elsewhere,
                    ..spec_with(&bs, alg, affinity)
                }
            })
    }

    proptest! {
        /// Any sequence of desired states, applied frontend by frontend,
        /// with restarts in between, leaves the maps equal to the last one.
        #[test]
        fn maps_always_end_equal_to_the_desired_state(
            steps in proptest::collection::vec(
                (
                    proptest::collection::btree_map((1u8..6, any::<bool>()), arb_spec(), 0..5),
                    any::<bool>(),
                ),
                1..8,
            )
        ) {
            let mut s = fresh();
            for (state, restart) in steps {
                if restart {
                    s = LbSync::restore(s.maps().clone(), CFG).expect("restore");
                }
                let desired: BTreeMap<Frontend, FrontendSpec> = state
                    .into_iter()
                    .map(|((f, inner), spec)| (if inner { internal(f) } else { fe(f) }, spec))
                    .collect();
                for (f, d) in &desired {
                    s.apply(*f, Some(d)).expect("apply");
                }
                s.retain(|f| desired.contains_key(f)).expect("retain");
                prop_assert_eq!(verify(s.maps(), &desired, CFG), Ok(()));
            }
        }
    }
}
