//! An atomic group of writes.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// Writes that land together or not at all: one log frame, one memtable update.
#[derive(Default, Debug, Clone)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    pub fn put(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(key.into(), value.into()));
    }

    pub fn delete(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(key.into()));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// Replaces every put's value with `seal(key, value)`.
    pub(crate) fn seal_values(&mut self, seal: impl Fn(&[u8], &[u8]) -> Vec<u8>) {
        for op in &mut self.ops {
            if let Op::Put(key, value) = op {
                *value = seal(key, value);
            }
        }
    }

    pub(crate) fn into_ops(self) -> Vec<Op> {
        self.ops
    }
}
