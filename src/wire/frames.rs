//! A `RecordStream`'s frames (`protocol::Route::RecordStream`), encoded from the bundles and
//! decoded into them piece by piece: neither side holds a frame's bytes in one buffer.
//!
//! A frame is `protocol::frame(&codec::encode(&bundles))`: a `u32` length, then borsh's
//! `Vec<Bundle>`. A push moves 512 MiB in 32 MiB frames; encoding each into a buffer, and
//! on the server gathering it into one and decoding it (borsh zero-fills every payload
//! before reading it) cost three fresh buffers a byte, and their page faults were a third of
//! the push's CPU time (perf). Here the client's body reads straight from the payloads, and
//! the server copies each arriving piece once, into the payload it belongs to.

use crate::wire::Bundle;
use crate::wire::protocol::MAX_FRAME;

/// Bytes of a borsh length or count.
const LEN: usize = 4;
/// Most memory one decoded frame may take: its bytes and the vectors that hold them. A frame
/// of many empty payloads would otherwise take six times its size in vector headers.
const MAX_HELD: usize = 2 * MAX_FRAME;

/// One frame's bytes, read (`std::io::Read`) from its bundles.
pub struct EncodedFrame {
    bundles: Vec<Bundle>,
    /// Every length and count of the encoding, in order.
    lens: Vec<u8>,
    pieces: Vec<Piece>,
    /// The piece being read, and how far into it.
    at: usize,
    offset: usize,
}

#[derive(Clone, Copy)]
enum Piece {
    /// `lens[start..start + LEN]`.
    Len(usize),
    Record(usize),
    Payload(usize, usize),
}

fn len_bytes(n: usize) -> [u8; LEN] {
    u32::try_from(n).expect("a frame's lengths are far below 4 GiB").to_le_bytes()
}

impl EncodedFrame {
    pub fn new(bundles: Vec<Bundle>) -> Self {
        let (mut lens, mut pieces) = (Vec::new(), Vec::new());
        let mut push_len = |n: usize, pieces: &mut Vec<Piece>| {
            pieces.push(Piece::Len(lens.len()));
            lens.extend_from_slice(&len_bytes(n));
        };
        let body = LEN + bundles.iter().map(|b| 2 * LEN + b.size() + LEN * b.payloads.len()).sum::<usize>();
        push_len(body, &mut pieces);
        push_len(bundles.len(), &mut pieces);
        for (i, b) in bundles.iter().enumerate() {
            push_len(b.record.len(), &mut pieces);
            pieces.push(Piece::Record(i));
            push_len(b.payloads.len(), &mut pieces);
            for (j, p) in b.payloads.iter().enumerate() {
                push_len(p.len(), &mut pieces);
                pieces.push(Piece::Payload(i, j));
            }
        }
        Self { bundles, lens, pieces, at: 0, offset: 0 }
    }

    fn piece(&self, piece: Piece) -> &[u8] {
        match piece {
            Piece::Len(start) => &self.lens[start..start + LEN],
            Piece::Record(i) => &self.bundles[i].record,
            Piece::Payload(i, j) => &self.bundles[i].payloads[j],
        }
    }
}

impl std::io::Read for EncodedFrame {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len()
            && let Some(&piece) = self.pieces.get(self.at)
        {
            let bytes = &self.piece(piece)[self.offset..];
            let n = bytes.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&bytes[..n]);
            filled += n;
            self.offset += n;
            if self.offset == self.piece(piece).len() {
                (self.at, self.offset) = (self.at + 1, 0);
            }
        }
        Ok(filled)
    }
}

/// What the decoder reads next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    FrameLen,
    BundleCount,
    RecordLen,
    Record,
    PayloadCount,
    PayloadLen,
    Payload,
}

/// Decodes a stream's bytes, in pieces cut anywhere, into frames of bundles; refuses a frame
/// over `MAX_FRAME` bytes from its length, and any length or count that does not fit in what
/// is left of its frame, before anything is allocated for it.
pub struct FrameDecoder {
    expect: Expect,
    /// A length's bytes while they arrive.
    len: Vec<u8>,
    /// Bytes of the current frame not yet read.
    left: usize,
    /// Memory the current frame takes once decoded, as far as its lengths and counts say.
    held: usize,
    /// Bundles (and payloads of the last one) still to come in this frame.
    bundles_left: usize,
    payloads_left: usize,
    /// The bytes of the record or payload being read, and how many it will have.
    bytes: Vec<u8>,
    want: usize,
    frame: Vec<Bundle>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self {
            expect: Expect::FrameLen,
            len: Vec::with_capacity(LEN),
            left: 0,
            held: 0,
            bundles_left: 0,
            payloads_left: 0,
            bytes: Vec::new(),
            want: 0,
            frame: Vec::new(),
        }
    }
}

impl FrameDecoder {
    /// The frames `data` completes, in order.
    pub fn take(&mut self, mut data: &[u8]) -> Result<Vec<Vec<Bundle>>, String> {
        let mut done = Vec::new();
        while !data.is_empty() {
            match self.expect {
                Expect::Record | Expect::Payload => {
                    let n = (self.want - self.bytes.len()).min(data.len());
                    self.bytes.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.bytes.len() == self.want {
                        self.finished_bytes(&mut done)?;
                    }
                }
                _ => {
                    let n = (LEN - self.len.len()).min(data.len());
                    self.len.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if self.len.len() == LEN {
                        let n = u32::from_le_bytes(self.len[..].try_into().expect("four bytes")) as usize;
                        self.len.clear();
                        self.finished_len(n, &mut done)?;
                    }
                }
            }
        }
        Ok(done)
    }

    /// Whether the stream may end here: no frame begun and not finished.
    pub fn at_boundary(&self) -> bool {
        self.expect == Expect::FrameLen && self.len.is_empty()
    }

    /// Takes `n` bytes of what is left of the frame, or says which length overran it.
    fn within(&mut self, n: usize, what: &str) -> Result<(), String> {
        self.left = self
            .left
            .checked_sub(n)
            .ok_or_else(|| format!("a frame whose {what} ({n} bytes) runs past its end ({} bytes left)", self.left))?;
        Ok(())
    }

    /// Counts `n` items of `size` bytes against `MAX_HELD`.
    fn hold(&mut self, n: usize, size: usize) -> Result<(), String> {
        self.held = self.held.saturating_add(n.saturating_mul(size));
        if self.held > MAX_HELD {
            return Err(format!("a frame that would take over {MAX_HELD} bytes of memory decoded"));
        }
        Ok(())
    }

    fn finished_len(&mut self, n: usize, done: &mut Vec<Vec<Bundle>>) -> Result<(), String> {
        match self.expect {
            Expect::FrameLen => {
                if n > MAX_FRAME {
                    return Err(format!("a frame of {n} bytes; at most {MAX_FRAME}"));
                }
                (self.left, self.held) = (n, 0);
                self.within(LEN, "bundle count")?;
                self.expect = Expect::BundleCount;
            }
            Expect::BundleCount => {
                // Each bundle takes at least its two lengths.
                self.within(n.saturating_mul(2 * LEN), "bundle count")?;
                self.left += n * 2 * LEN;
                self.hold(n, size_of::<Bundle>())?;
                self.bundles_left = n;
                self.frame = Vec::with_capacity(n.min(1024));
                self.next_bundle(done)?;
            }
            Expect::RecordLen => self.start_bytes(n, Expect::Record, "record", done)?,
            Expect::PayloadCount => {
                self.within(n.saturating_mul(LEN), "payload count")?;
                self.left += n * LEN;
                self.hold(n, size_of::<Vec<u8>>())?;
                self.payloads_left = n;
                self.next_payload(done)?;
            }
            Expect::PayloadLen => self.start_bytes(n, Expect::Payload, "payload", done)?,
            Expect::Record | Expect::Payload => unreachable!("bytes, not a length"),
        }
        Ok(())
    }

    fn start_bytes(&mut self, n: usize, expect: Expect, what: &str, done: &mut Vec<Vec<Bundle>>) -> Result<(), String> {
        self.within(n, what)?;
        self.hold(n, 1)?;
        (self.bytes, self.want, self.expect) = (Vec::with_capacity(n), n, expect);
        if n == 0 {
            // Complete already: the stream may end right after it.
            self.finished_bytes(done)?;
        }
        Ok(())
    }

    /// The record or payload being read is complete (possibly empty).
    fn finished_bytes(&mut self, done: &mut Vec<Vec<Bundle>>) -> Result<(), String> {
        let bytes = std::mem::take(&mut self.bytes);
        match self.expect {
            Expect::Record => {
                self.within(LEN, "payload count")?;
                self.frame.push(Bundle { record: bytes, payloads: Vec::new() });
                self.expect = Expect::PayloadCount;
            }
            Expect::Payload => {
                self.frame.last_mut().expect("a payload belongs to a bundle").payloads.push(bytes);
                self.next_payload(done)?;
            }
            _ => unreachable!("a length, not bytes"),
        }
        Ok(())
    }

    fn next_payload(&mut self, done: &mut Vec<Vec<Bundle>>) -> Result<(), String> {
        if self.payloads_left == 0 {
            return self.next_bundle(done);
        }
        self.payloads_left -= 1;
        self.within(LEN, "payload length")?;
        self.expect = Expect::PayloadLen;
        Ok(())
    }

    fn next_bundle(&mut self, done: &mut Vec<Vec<Bundle>>) -> Result<(), String> {
        if self.bundles_left == 0 {
            if self.left > 0 {
                return Err(format!("a frame with {} bytes past its last bundle", self.left));
            }
            done.push(std::mem::take(&mut self.frame));
            self.expect = Expect::FrameLen;
            return Ok(());
        }
        self.bundles_left -= 1;
        self.within(LEN, "record length")?;
        self.expect = Expect::RecordLen;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use proptest::prelude::*;

    use super::*;
    use crate::record::codec;
    use crate::wire::protocol::frame;

    fn bundles() -> Vec<Vec<Bundle>> {
        let b =
            |r: &[u8], ps: &[&[u8]]| Bundle { record: r.to_vec(), payloads: ps.iter().map(|p| p.to_vec()).collect() };
        vec![
            vec![b(b"rec", &[b"one", b"", &[7; 1000]]), b(b"", &[]), b(b"second", &[b"x"])],
            Vec::new(),
            vec![b(&[1; 300], &[&[2; 70]]), b(b"tail", &[b"z", b""])],
        ]
    }

    fn encoded(frames: &[Vec<Bundle>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            EncodedFrame::new(f.clone()).read_to_end(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn encoding_is_borshs_framed() {
        for f in bundles() {
            assert_eq!(encoded(std::slice::from_ref(&f)), frame(&codec::encode(&f)));
            // Read through a small buffer, as a request body is.
            let mut small = Vec::new();
            let mut reader = EncodedFrame::new(f.clone());
            let mut buf = [0; 7];
            loop {
                match reader.read(&mut buf).unwrap() {
                    0 => break,
                    n => small.extend_from_slice(&buf[..n]),
                }
            }
            assert_eq!(small, frame(&codec::encode(&f)));
        }
    }

    #[test]
    fn frames_come_out_whole_however_the_bytes_are_cut() {
        let frames = bundles();
        let stream = encoded(&frames);
        for cut in [1, 2, 3, 5, 7, 64, 1001, stream.len()] {
            let mut decoder = FrameDecoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                got.extend(decoder.take(piece).unwrap());
            }
            assert_eq!(got, frames, "pieces of {cut} bytes");
            assert!(decoder.at_boundary());
        }
        let mut decoder = FrameDecoder::default();
        decoder.take(&stream[..stream.len() - 2]).unwrap();
        assert!(!decoder.at_boundary(), "a stream cut inside a frame is not at a boundary");
    }

    #[test]
    fn lengths_that_do_not_fit_are_refused_before_anything_is_held() {
        let refused = |bytes: &[u8]| FrameDecoder::default().take(bytes).unwrap_err();
        assert!(refused(&(MAX_FRAME as u32 + 1).to_le_bytes()).contains("at most"));
        // A count of bundles that the frame cannot hold.
        let body = [&u32::MAX.to_le_bytes()[..], &[0; 8]].concat();
        assert!(refused(&frame(&body)).contains("bundle count"));
        // A record longer than the frame.
        let body = [&1u32.to_le_bytes()[..], &1000u32.to_le_bytes(), &[0; 8]].concat();
        assert!(refused(&frame(&body)).contains("record"));
        // A payload count past the frame.
        let body = [&1u32.to_le_bytes()[..], &0u32.to_le_bytes(), &u32::MAX.to_le_bytes()].concat();
        assert!(refused(&frame(&body)).contains("payload count"));
        // Bytes past the last bundle: borsh would refuse them, so does the decoder.
        let good = codec::encode(&bundles()[0]);
        assert!(refused(&frame(&[&good[..], b"extra"].concat())).contains("past its last bundle"));
        // Many empty payloads: small on the wire, six times larger as vectors.
        let many = (MAX_FRAME / 4 - 8) as u32;
        let body = [&1u32.to_le_bytes()[..], &0u32.to_le_bytes(), &many.to_le_bytes()].concat();
        let mut decoder = FrameDecoder::default();
        decoder.take(&(MAX_FRAME as u32 - 8).to_le_bytes()).unwrap();
        assert!(decoder.take(&body).unwrap_err().contains("memory"));
        // A frame too short for its bundle count.
        assert!(refused(&frame(&1u32.to_le_bytes())).contains("bundle count"));
    }

    fn bundle() -> impl Strategy<Value = Bundle> {
        use proptest::collection::vec;
        (vec(any::<u8>(), 0..40), vec(vec(any::<u8>(), 0..40), 0..5))
            .prop_map(|(record, payloads)| Bundle { record, payloads })
    }

    proptest! {
        #[test]
        fn decoding_agrees_with_borsh(
            frames in proptest::collection::vec(proptest::collection::vec(bundle(), 0..4), 1..4),
            cut in 1usize..50,
        ) {
            let stream = encoded(&frames);
            let borsh: Vec<u8> = frames.iter().flat_map(|f| frame(&codec::encode(f))).collect();
            prop_assert_eq!(&stream, &borsh);
            let mut decoder = FrameDecoder::default();
            let mut got = Vec::new();
            for piece in stream.chunks(cut) {
                got.extend(decoder.take(piece).unwrap());
            }
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn any_bytes_decode_as_borsh_would(body in proptest::collection::vec(any::<u8>(), 0..80)) {
            // Whatever a frame holds, the decoder refuses it or reads what borsh reads.
            let ours = FrameDecoder::default().take(&frame(&body));
            match borsh::from_slice::<Vec<Bundle>>(&body) {
                Ok(bundles) => prop_assert_eq!(ours.unwrap(), vec![bundles]),
                Err(_) => prop_assert!(ours.is_err()),
            }
        }
    }
}
