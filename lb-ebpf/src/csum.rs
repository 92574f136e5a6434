//! Internet checksums (RFC 1071) computed in the program, for headers it
//! builds or rewrites whole; RFC 1624 updates for ones it changes a part of.

/// One's-complement sum of big-endian 16-bit words, added to `acc`.
#[inline(always)]
pub fn sum(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    acc
}

/// The sum folded to 16 bits (the checksum is its complement).
#[inline(always)]
pub fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    acc as u16
}

/// The checksum of `bytes` (plus the partial sum `acc`), as stored.
#[inline(always)]
pub fn checksum(acc: u32, bytes: &[u8]) -> u16 {
    !fold(sum(acc, bytes))
}

/// RFC 1624: the checksum `csum` (as stored) after `old` became `new`.
#[inline(always)]
pub fn update(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    // ~C' = ~C + ~m + m', with ~m added as 0xffff - m per word.
    let mut acc = (!csum) as u32;
    let mut i = 0;
    while i + 1 < old.len() && i + 1 < new.len() {
        acc += 0xffff - u16::from_be_bytes([old[i], old[i + 1]]) as u32;
        acc += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    !fold(acc)
}
