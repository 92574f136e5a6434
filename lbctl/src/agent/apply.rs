//! Where map writes go: a trait with the real pinned maps, an in-memory map
//! for tests, and a fault-injecting wrapper that makes writes fail at random.

use super::state::{MapState, Op};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("writing {op:?}: {source}")]
    Write {
        op: Box<Op>,
        #[source]
        source: std::io::Error,
    },
    #[error("reading map {map}: {source}")]
    Read {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("injected fault on {0:?}")]
    Injected(Box<Op>),
}

pub trait MapWriter {
    /// Performs one write. Deleting an absent entry succeeds (idempotent).
    fn apply(&mut self, op: &Op) -> Result<(), MapError>;
    /// Performs `ops` in order (a writer may batch consecutive ones); on
    /// an error, how many landed before it.
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), (usize, MapError)> {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }
    /// Reads back every service map entry.
    fn read(&self) -> Result<MapState, MapError>;
}

/// Maps in memory: unit tests and `--dry-run`.
#[derive(Clone, Debug, Default)]
pub struct InMemory {
    pub state: MapState,
    pub writes: usize,
}

impl MapWriter for InMemory {
    fn apply(&mut self, op: &Op) -> Result<(), MapError> {
        self.writes += 1;
        self.state.apply(op);
        Ok(())
    }

    fn read(&self) -> Result<MapState, MapError> {
        Ok(self.state.clone())
    }
}

/// Fails a write with probability `1/one_in`, from a seeded generator so a
/// failing test can be replayed.
#[derive(Debug)]
pub struct Faulty<W> {
    pub inner: W,
    one_in: u64,
    rng: u64,
    pub injected: usize,
}

impl<W> Faulty<W> {
    pub fn new(inner: W, one_in: u64, seed: u64) -> Self {
        Self {
            inner,
            one_in: one_in.max(1),
            rng: seed | 1,
            injected: 0,
        }
    }

    fn roll(&mut self) -> u64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl<W: MapWriter> MapWriter for Faulty<W> {
    fn apply(&mut self, op: &Op) -> Result<(), MapError> {
        if self.roll().is_multiple_of(self.one_in) {
            self.injected += 1;
            return Err(MapError::Injected(Box::new(op.clone())));
        }
        self.inner.apply(op)
    }

    fn read(&self) -> Result<MapState, MapError> {
        self.inner.read()
    }
}
