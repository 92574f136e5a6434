//! Per-packet connection tracking for traffic that is translated per packet
//! (NodePort, external and LoadBalancer IPs arriving on a node device).
//!
//! Each flow has two entries: the original direction, keyed by the tuple the
//! client sent, and the reply direction, keyed by the tuple the backend
//! answers with. Each entry says how to rewrite a packet that matches it, so
//! one lookup translates a packet in either direction.

use crate::user_pod;

pub const CT_ORIGINAL: u8 = 0;
pub const CT_REPLY: u8 = 1;

/// `Ct4Entry::flags`.
pub const CT_SNAT: u8 = 1 << 0;
pub const CT_LOCAL_BACKEND: u8 = 1 << 1;
pub const CT_SEEN_REPLY: u8 = 1 << 2;
/// A RST, or a FIN in both directions: the connection is ending.
pub const CT_CLOSING: u8 = 1 << 3;
/// A FIN from the client, from the backend: one direction is done, the
/// other may go on sending (a half-close keeps the flow established).
pub const CT_FIN_ORIGINAL: u8 = 1 << 4;
pub const CT_FIN_REPLY: u8 = 1 << 5;
/// Direct server return. On the node the client's packets come to (an
/// original-direction entry): the backend is on another node and gets the
/// packets in IPIP, `nat_src_addr` being the outer source (this node's
/// address; the inner source stays the client), and its replies go
/// straight to the client, so this node sees only the client's direction.
/// On the backend's node (a reply-direction entry, `CT_LOCAL_BACKEND`
/// too): made from the encapsulated packets, it turns the backend's
/// replies into the frontend's.
pub const CT_DSR: u8 = 1 << 6;

/// `Ct4Entry::service_id`/`backend_id` of a flow this node knows neither
/// of (a DSR flow's reply entry on the backend's node, when the frontend
/// is another node's NodePort): not counted.
pub const CT_NO_ID: u32 = u32::MAX;

/// Lifetimes in seconds, by what the flow has shown: an entry is dead
/// after `lifetime` seconds without a packet in either direction.
pub const CT_LIFETIME_TCP_SYN: u32 = 60;
pub const CT_LIFETIME_TCP_ESTABLISHED: u32 = 6 * 3600;
pub const CT_LIFETIME_TCP_CLOSING: u32 = 10;
pub const CT_LIFETIME_UDP: u32 = 60;
/// Linux's TIME_WAIT (TCP_TIMEWAIT_LEN): an SNAT port of a closed TCP flow
/// is not given again before, as the backend may still hold the old
/// connection.
pub const CT_TIME_WAIT_S: u32 = 60;

/// 8-byte aligned: the datapath compares keys as two u64 words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ct4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    /// `CT_ORIGINAL` or `CT_REPLY`.
    pub dir: u8,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<Ct4Key>() == 16);

impl Ct4Key {
    /// The key as two words, for comparing in two steps.
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: 16 bytes, 8-aligned, no padding (fields fill it).
        unsafe { *(self as *const Ct4Key as *const [u64; 2]) }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Entry {
    /// Rewrite for a matching packet (wire order; equal to the packet's
    /// field when that field is not translated).
    pub nat_src_addr: u32,
    pub nat_dst_addr: u32,
    pub nat_src_port: u16,
    pub nat_dst_port: u16,
    pub service_id: u32,
    pub backend_id: u32,
    /// Seconds of `bpf_ktime_get_coarse_ns` when created and last seen.
    pub created_s: u32,
    pub last_seen_s: u32,
    /// The entry is dead after `last_seen_s + lifetime_s`.
    pub lifetime_s: u32,
    pub flags: u8,
    pub _pad: [u8; 3],
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Ct4Entry>() == 56);

user_pod!(Ct4Key, Ct4Entry);

/// Flows a set of the flow table holds (a power of two: the datapath
/// masks way indexes with `CT_WAYS - 1`).
pub const CT_WAYS: usize = 4;
const _: () = assert!(CT_WAYS.is_power_of_two());

/// One set of the flow table (`LB4_CT_V2`): an array of sets, a flow's
/// entry in the set its key hashes to ([`ct_set_index`]), in any of its
/// `CT_WAYS` ways. A kernel hash map costs an allocation from its free
/// list, a bucket lock and a lookup per insert (two per new flow, ~80% of
/// a new flow's time); here an insert is the lookup's probe and a store.
/// A full set gives up its way with the least to lose (`ct_victim_rank`):
/// an empty or expired one, then the oldest flow that never had a reply,
/// then the oldest flow.
///
/// BPF programs have no compare-and-exchange before cpu v3, so ways are
/// not locked: `check[i]` is a hash of way `i`'s key and the fields that
/// say where its packets go ([`ct_check`]), written with them. A way
/// whose check does not match is being written, or was torn by two CPUs
/// writing it at once, and counts as empty. Index 0 of the table holds no
/// flows but the table's parameters ([`Ct4Params`]).
/// `meta[i]` is what choosing a way to give up needs ([`ct_meta`]: when
/// the flow expires, whether it was answered), kept next to the keys so a
/// new flow reads one cache line of the set, not its four entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Set {
    pub check: [u32; CT_WAYS],
    pub meta: [u32; CT_WAYS],
    pub keys: [Ct4Key; CT_WAYS],
    pub entries: [Ct4Entry; CT_WAYS],
}
const _: () = assert!(core::mem::size_of::<Ct4Set>() == 8 * CT_WAYS + 16 * CT_WAYS + 56 * CT_WAYS);

user_pod!(Ct4Set);

/// The flow table's parameters, in `check` of its index 0: written once by
/// the agent when it makes the table, before any program runs on it, and
/// kept with the table (a resized table is a new table, its flows moved
/// under its own parameters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ct4Params {
    /// Hash seed, random per table: where a flow lands cannot be aimed at
    /// from outside.
    pub seed: u32,
    /// Sets at indexes `1..=sets` (0: the table is not made yet).
    pub sets: u32,
}

impl Ct4Params {
    #[inline(always)]
    pub fn of(head: &Ct4Set) -> Self {
        Ct4Params {
            seed: head.check[0],
            sets: head.check[1],
        }
    }

    /// The table's index 0 holding these parameters.
    pub fn head(self) -> Ct4Set {
        let mut s = Ct4Set::default();
        s.check[0] = self.seed;
        s.check[1] = self.sets;
        s
    }
}

/// Entries in the flow table for `flows` flow directions: the parameters'
/// index and enough sets of `CT_WAYS` ways.
pub const fn ct_table_len(flows: u32) -> u32 {
    1 + flows.div_ceil(CT_WAYS as u32)
}

/// The sets of a table of `len` entries.
pub const fn ct_sets(len: u32) -> u32 {
    len.saturating_sub(1)
}

/// Mixes two words into one (a multiply, xor-shifts and a second
/// multiply, as splitmix64's finalizer): every input bit reaches the low
/// 32 bits, which pick the set.
#[inline(always)]
fn mix2(x: u64, y: u64) -> u64 {
    let h = x.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ y;
    let h = (h ^ (h >> 32)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let h = (h ^ (h >> 29)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 32)
}

#[inline(always)]
fn key_words(k: &Ct4Key) -> (u64, u64) {
    (
        ((k.src_addr as u64) << 32) | k.dst_addr as u64,
        ((k.src_port as u64) << 48)
            | ((k.dst_port as u64) << 32)
            | ((k.proto as u64) << 8)
            | k.dir as u64,
    )
}

/// The index of the set key `k` lives in: the tuple's two words mixed
/// with the seed, reduced to `1..=sets` by a multiply (any set count, no
/// mask).
#[inline(always)]
pub fn ct_set_index(k: &Ct4Key, p: Ct4Params) -> u32 {
    let (a, b) = key_words(k);
    let h = mix2(a ^ ((p.seed as u64) << 16), b ^ p.seed as u64);
    1 + (((h & 0xffff_ffff) * p.sets as u64) >> 32) as u32
}

/// The check word of a way holding `k` and `e`: a hash of the key and the
/// fields fixed when the flow is made (the rewrite, ids, creation time),
/// never 0 (an empty way's). Counters, flags and times change in place.
/// It tells a whole way from a torn one (two flows' halves), not an
/// adversary's forgery: nothing outside writes the table.
#[inline(always)]
pub fn ct_check(k: &Ct4Key, e: &Ct4Entry) -> u32 {
    let (a, b) = key_words(k);
    let c = ((e.nat_src_addr as u64) << 32) | e.nat_dst_addr as u64;
    let d = ((e.nat_src_port as u64) << 48) | ((e.nat_dst_port as u64) << 32) | e.created_s as u64;
    let f = ((e.service_id as u64) << 32) | e.backend_id as u64;
    (mix2(mix2(a, b) ^ c, d ^ f.rotate_left(16)) as u32) | 1
}

/// Whether a way holds a flow (its entry has a lifetime; a removed or
/// never written way is zeros).
#[inline(always)]
pub fn ct_occupied(e: &Ct4Entry) -> bool {
    e.lifetime_s != 0
}

/// A way's `meta` for its entry `e`: when it expires (`last_seen_s +
/// lifetime_s`, to 2 s) in the upper 31 bits, whether it was answered
/// (`CT_SEEN_REPLY`) in bit 0. An empty way's is 0: long expired.
#[inline(always)]
pub fn ct_meta(e: &Ct4Entry) -> u32 {
    (e.last_seen_s.wrapping_add(e.lifetime_s) & !1) | u32::from(e.flags & CT_SEEN_REPLY != 0)
}

/// How little a way whose `meta` is this has to lose at `now`, lowest
/// first: empty or expired, then flows that never had a reply (a SYN
/// flood's), then the rest; the soonest to expire first within each.
#[inline(always)]
pub fn ct_victim_rank(meta: u32, now: u32) -> u64 {
    let expires = meta & !1;
    let class: u64 = if now.wrapping_sub(expires) as i32 > 0 {
        0
    } else if meta & 1 == 0 {
        1
    } else {
        2
    };
    (class << 32) | expires.wrapping_sub(now) as u64
}

/// A fragmented datagram as its fragments carry it: only the first has the
/// ports, so the device path remembers them under the IP header's fields
/// every fragment repeats (as Cilium does), and translates the later
/// fragments with the same flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frag4Key {
    pub src_addr: u32,
    pub dst_addr: u32,
    /// The IP identification field (wire order).
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Frag4Key>() == 12);

/// The ports of a fragmented datagram's first fragment (wire order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frag4Ports {
    pub src_port: u16,
    pub dst_port: u16,
}
const _: () = assert!(core::mem::size_of::<Frag4Ports>() == 4);

user_pod!(Frag4Key, Frag4Ports);
