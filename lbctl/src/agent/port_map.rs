//! The port map (`LB_PORTS_V1`), kept beside the frontends: a bit per
//! destination port that some frontend in the maps uses or that an SNAT
//! range holds. The device path passes a packet to any other port at once
//! (once the config says `CFG_PORTS`), so the map must never miss a port
//! that is in use: a flush sets a new frontend's bit before the frontend
//! is written and clears a bit only after its last frontend is gone.

use std::{collections::BTreeMap, ops::RangeInclusive};

use lb_common::ports::{PORT_WORDS, port_bit};

use super::state::Op;

pub struct PortMap {
    /// Frontends in the target using each port (host order).
    refs: Vec<u32>,
    /// The target's words: a bit per port with frontends or in an SNAT
    /// range.
    words: Vec<u64>,
    /// Bits of the SNAT ranges this agent has seen (the one it runs with
    /// and the one the pinned config had: replies of flows SNATed before
    /// a range change keep coming to the old ports).
    snat: Vec<u64>,
    /// What the map holds, as read at adoption and written since.
    written: Vec<u64>,
    /// The map has been written whole by this agent (the config may then
    /// say `CFG_PORTS`).
    whole: bool,
}

impl PortMap {
    /// Starts from what the pinned map holds.
    pub fn adopt(pinned: &BTreeMap<u32, u64>) -> Self {
        let mut written = vec![0; PORT_WORDS as usize];
        for (&i, &w) in pinned {
            if let Some(x) = written.get_mut(i as usize) {
                *x = w;
            }
        }
        Self {
            refs: vec![0; 1 << 16],
            words: vec![0; PORT_WORDS as usize],
            snat: vec![0; PORT_WORDS as usize],
            written,
            whole: false,
        }
    }

    fn refresh(&mut self, port: u16) {
        let (i, bit) = port_bit(port);
        let i = i as usize;
        if self.refs[port as usize] > 0 || self.snat[i] & bit != 0 {
            self.words[i] |= bit;
        } else {
            self.words[i] &= !bit;
        }
    }

    /// A frontend on `port` (wire order) came into the target.
    pub fn frontend_added(&mut self, port: u16) {
        let port = u16::from_be(port);
        self.refs[port as usize] += 1;
        if self.refs[port as usize] == 1 {
            self.refresh(port);
        }
    }

    /// A frontend on `port` (wire order) left the target.
    pub fn frontend_removed(&mut self, port: u16) {
        let port = u16::from_be(port);
        let n = &mut self.refs[port as usize];
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.refresh(port);
        }
    }

    /// Ports of an SNAT range: kept for the agent's life.
    pub fn add_snat_range(&mut self, range: RangeInclusive<u16>) {
        for port in range {
            let (i, bit) = port_bit(port);
            self.snat[i as usize] |= bit;
            self.words[i as usize] |= bit;
        }
    }

    /// Writes that bring the map to the target; with `keep`, bits the map
    /// has are kept (before the frontends are written: a port leaves the
    /// map only after its frontends).
    pub fn ops(&self, keep: bool) -> Vec<Op> {
        (0..PORT_WORDS as usize)
            .filter_map(|i| {
                let w = if keep {
                    self.words[i] | self.written[i]
                } else {
                    self.words[i]
                };
                (w != self.written[i]).then_some(Op::PutPorts(i as u32, w))
            })
            .collect()
    }

    /// `op` landed in the map.
    pub fn landed(&mut self, op: &Op) {
        if let Op::PutPorts(i, w) = *op
            && let Some(x) = self.written.get_mut(i as usize)
        {
            *x = w;
        }
    }

    /// The target's words that are not 0.
    pub fn target(&self) -> BTreeMap<u32, u64> {
        (0..PORT_WORDS)
            .zip(&self.words)
            .filter(|(_, w)| **w != 0)
            .map(|(i, w)| (i, *w))
            .collect()
    }

    /// The map holds the target whole (after a flush).
    pub fn set_whole(&mut self) {
        self.whole = true;
    }

    pub fn is_whole(&self) -> bool {
        self.whole
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_set_before_its_frontend_and_cleared_after_its_last() {
        let mut m = PortMap::adopt(&BTreeMap::new());
        let np = 30080u16.to_be();
        m.frontend_added(np);
        m.frontend_added(np);
        let (i, bit) = port_bit(30080);
        assert_eq!(m.ops(true), [Op::PutPorts(i, bit)]);
        for op in m.ops(true) {
            m.landed(&op);
        }
        assert!(m.ops(false).is_empty(), "nothing more after the flush");
        // One of two frontends leaves: the bit stays.
        m.frontend_removed(np);
        assert!(m.ops(false).is_empty());
        // The last: kept while the frontends are written, cleared after.
        m.frontend_removed(np);
        assert!(m.ops(true).is_empty(), "kept before the frontend goes");
        assert_eq!(m.ops(false), [Op::PutPorts(i, 0)]);
    }

    #[test]
    fn snat_ports_stay_and_adoption_writes_only_differences() {
        let (i, bit) = port_bit(61000);
        let pinned = BTreeMap::from([(i, bit)]);
        let mut m = PortMap::adopt(&pinned);
        m.add_snat_range(61000..=61000);
        assert!(m.ops(false).is_empty(), "the pinned map already holds it");
        // A frontend on an SNAT port comes and goes: the port stays.
        m.frontend_added(61000u16.to_be());
        m.frontend_removed(61000u16.to_be());
        assert!(m.ops(false).is_empty());
        // A whole range: every port of it, over word boundaries.
        m.add_snat_range(61000..=61200);
        let set: u32 = m
            .ops(false)
            .iter()
            .map(|op| match op {
                Op::PutPorts(_, w) => w.count_ones(),
                _ => 0,
            })
            .sum();
        assert_eq!(set, 201);
    }
}
