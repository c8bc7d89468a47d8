//! The local disk spool: where ingest keeps the rounds it has answered for while
//! Redis cannot take them, until it can.
//!
//! A spool is a directory of append-only segment files, `<first round id>.spool`
//! (16 hex digits, so names sort in write order). Each record is one writer round
//! ([`Round`]) framed as `length: u32 LE | crc32: u32 LE | payload`, the payload a
//! MessagePack encoding of the round. On open every segment is read through:
//! a torn or corrupt record at the end of the last segment (a crash mid-write) is
//! cut off, since no producer was answered for it; a bad record anywhere else means
//! the disk lost data that was answered for, so the segment is set aside as
//! `.corrupt` for an operator and the error is logged loudly.
//!
//! Draining reads rounds from the head in order; a segment is deleted only when
//! every round in it is in Redis. Rounds carry ids that the writer's append script
//! remembers per stream, so a round drained twice (a crash between the write and
//! the delete) is written once.
//!
//! Durability: with [`Fsync::Always`] each append is `fdatasync`ed before the
//! producers are answered, so an answered event survives a crash of the machine;
//! with [`Fsync::Never`] it survives a crash of ingest but not of the machine.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// One entry's fields, in order.
pub type Fields = Vec<(String, Vec<u8>)>;

/// Entries bound for one stream in one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    pub key: String,
    /// The XADD trim arguments (`MAXLEN ~ n`, ...), possibly none.
    pub trim: Vec<String>,
    pub entries: Vec<Fields>,
}

/// What one writer round appends, to every stream it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// Unique per writer and increasing: what makes a repeated round a no-op.
    pub id: u64,
    pub appends: Vec<Append>,
}

/// When appends reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Before the producers are answered.
    Always,
    /// When the operating system writes its cache back.
    Never,
}

impl FromStr for Fsync {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            _ => Err(format!("expected always or never, got {s:?}")),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    /// Bytes on disk at most; an append past it is refused.
    pub max_bytes: u64,
    /// A new segment is started once the current one is this big.
    pub segment_bytes: u64,
    pub fsync: Fsync,
}

impl SpoolConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            fsync: Fsync::Always,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir}: {source}")]
    Io {
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("spool {dir} is in use by another process")]
    Locked { dir: String },
    #[error("the spool is full: {held} bytes held, {max} allowed")]
    Full { held: u64, max: u64 },
    #[error("spool record is corrupt: {0}")]
    Corrupt(String),
}

/// Largest record accepted when reading: a bigger length is corruption, not a
/// round (rounds are bounded by the writer's pipeline size).
const MAX_RECORD: usize = 256 << 20;
const FRAME_HEADER: u64 = 8;

struct Segment {
    path: PathBuf,
    bytes: u64,
}

/// Where the next round to drain starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    segment: usize,
    offset: u64,
}

pub struct Spool {
    cfg: SpoolConfig,
    segments: VecDeque<Segment>,
    /// Offset of the first undrained round in the first segment.
    head: u64,
    /// Open for appends: the last segment, once this process has written to it.
    tail: Option<File>,
    rounds: u64,
    last_id: u64,
    id_floor: u64,
    /// Held for the spool's life: one process per spool.
    _lock: File,
}

impl Spool {
    /// Opens (creating if needed) the spool in `cfg.dir`, checking every record.
    pub fn open(cfg: SpoolConfig) -> Result<Self, SpoolError> {
        let io = io_err(&cfg.dir);
        fs::create_dir_all(&cfg.dir).map_err(io)?;
        let lock = File::create(cfg.dir.join("lock")).map_err(io)?;
        // A lock can outlive its holder briefly: a process forked between open
        // and exec holds a copy, as does an ingest still exiting. Wait a second
        // before calling it taken.
        let mut tries = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(SpoolError::Locked {
                        dir: cfg.dir.display().to_string(),
                    })
                }
                Err(fs::TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        let mut names: Vec<PathBuf> = fs::read_dir(&cfg.dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "spool"))
            .collect();
        names.sort();
        let mut spool = Self {
            segments: VecDeque::new(),
            head: 0,
            tail: None,
            rounds: 0,
            last_id: 0,
            id_floor: read_id_floor(&cfg.dir).map_err(io)?,
            _lock: lock,
            cfg,
        };
        let count = names.len();
        for (i, path) in names.into_iter().enumerate() {
            let last = i + 1 == count;
            let scan = scan_segment(&path).map_err(io_err(&spool.cfg.dir))?;
            if let Some(bad) = &scan.bad {
                if last {
                    tracing::warn!(segment = %path.display(), at = scan.good_bytes, problem = %bad,
                        "spool: cutting off a torn record at the end (written, never answered)");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(io_err(&spool.cfg.dir))?;
                    f.set_len(scan.good_bytes)
                        .and_then(|()| f.sync_all())
                        .map_err(io_err(&spool.cfg.dir))?;
                } else {
                    let aside = path.with_extension("corrupt");
                    tracing::error!(segment = %path.display(), at = scan.good_bytes, problem = %bad,
                        set_aside = %aside.display(), rounds_after = "unknown",
                        "spool: a record in the middle of the spool is corrupt; the rest of this segment cannot be drained");
                    fs::rename(&path, &aside).map_err(io_err(&spool.cfg.dir))?;
                }
            }
            if scan.rounds == 0 && last && scan.bad.is_none() {
                // An empty segment left by a crash right after it was made.
                let _ = fs::remove_file(&path);
                continue;
            }
            if !last && scan.bad.is_some() {
                continue;
            }
            spool.rounds += scan.rounds;
            spool.last_id = spool.last_id.max(scan.last_id);
            spool.segments.push_back(Segment {
                path,
                bytes: scan.good_bytes,
            });
        }
        Ok(spool)
    }

    /// Rounds not yet drained.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    pub fn is_empty(&self) -> bool {
        self.rounds == 0
    }

    /// Bytes on disk, drained rounds of the first segment included.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The highest round id ever written here: new ids must be above it.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Flushes what was appended to disk (a no-op under [`Fsync::Always`]).
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        match &self.tail {
            Some(f) => f.sync_data().map_err(io_err(&self.cfg.dir)),
            None => Ok(()),
        }
    }

    /// Every round id a writer on this spool used is below this.
    pub fn id_floor(&self) -> u64 {
        self.id_floor
    }

    /// Records that ids below `floor` may have been used, durably.
    pub fn raise_id_floor(&mut self, floor: u64) -> Result<(), SpoolError> {
        let io = io_err(&self.cfg.dir);
        let tmp = self.cfg.dir.join("id-floor.tmp");
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(floor.to_string().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        fs::rename(&tmp, self.cfg.dir.join(ID_FLOOR)).map_err(io)?;
        File::open(&self.cfg.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.id_floor = floor;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Appends a round; with [`Fsync::Always`] it is on disk when this returns.
    pub fn append(&mut self, round: &Round) -> Result<(), SpoolError> {
        let payload = encode_round(round);
        let frame_len = FRAME_HEADER + payload.len() as u64;
        let held = self.bytes();
        if held + frame_len > self.cfg.max_bytes {
            return Err(SpoolError::Full {
                held,
                max: self.cfg.max_bytes,
            });
        }
        let io = io_err(&self.cfg.dir);
        // Never behind a segment this process did not start: its end may be torn.
        let roll = self.tail.is_none()
            || self
                .segments
                .back()
                .is_none_or(|s| s.bytes >= self.cfg.segment_bytes);
        if roll {
            let path = self.cfg.dir.join(format!("{:016x}.spool", round.id));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io)?;
            if self.cfg.fsync == Fsync::Always {
                // The new name must survive a crash as well as its contents.
                File::open(&self.cfg.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(&self.cfg.dir))?;
            }
            self.segments.push_back(Segment { path, bytes: 0 });
            self.tail = Some(file);
        }
        let (Some(tail), Some(seg)) = (self.tail.as_mut(), self.segments.back_mut()) else {
            return Err(SpoolError::Corrupt("no segment to append to".into()));
        };
        let mut frame = Vec::with_capacity(frame_len as usize);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        let written = tail.write_all(&frame).and_then(|()| {
            if self.cfg.fsync == Fsync::Always {
                tail.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Whatever part of the frame reached the file is cut off, so that the
            // next append does not land behind a torn record.
            let _ = tail.set_len(seg.bytes);
            return Err(io_err(&self.cfg.dir)(e));
        }
        seg.bytes += frame_len;
        self.rounds += 1;
        self.last_id = self.last_id.max(round.id);
        Ok(())
    }

    /// Up to `max` rounds from the head, in order, and where the head would be
    /// after them (for [`Spool::consume`]).
    pub fn peek(&self, max: usize) -> Result<(Vec<Round>, Cursor), SpoolError> {
        let mut out = Vec::new();
        let mut cur = Cursor {
            segment: 0,
            offset: self.head,
        };
        while out.len() < max && cur.segment < self.segments.len() {
            let seg = &self.segments[cur.segment];
            if cur.offset >= seg.bytes {
                cur = Cursor {
                    segment: cur.segment + 1,
                    offset: 0,
                };
                continue;
            }
            let io = io_err(&self.cfg.dir);
            let mut f = File::open(&seg.path).map_err(io)?;
            f.seek(SeekFrom::Start(cur.offset))
                .map_err(io_err(&self.cfg.dir))?;
            let mut r = BufReader::new(f);
            while out.len() < max && cur.offset < seg.bytes {
                let payload = read_frame(&mut r)
                    .map_err(io_err(&self.cfg.dir))?
                    .map_err(SpoolError::Corrupt)?;
                out.push(decode_round(&payload).map_err(SpoolError::Corrupt)?);
                cur.offset += FRAME_HEADER + payload.len() as u64;
            }
        }
        Ok((out, cur))
    }

    /// Marks the rounds before `cursor` as drained, deleting every segment that
    /// holds only drained rounds.
    pub fn consume(&mut self, cursor: Cursor, rounds: usize) -> Result<(), SpoolError> {
        self.rounds = self.rounds.saturating_sub(rounds as u64);
        let io = io_err(&self.cfg.dir);
        for _ in 0..cursor.segment {
            if let Some(seg) = self.segments.pop_front() {
                fs::remove_file(&seg.path).map_err(io)?;
            }
        }
        self.head = cursor.offset;
        if self.rounds == 0 {
            // Everything is in Redis: the spool becomes empty on disk too.
            for seg in self.segments.drain(..) {
                fs::remove_file(&seg.path).map_err(io)?;
            }
            self.tail = None;
            self.head = 0;
        }
        Ok(())
    }
}

const ID_FLOOR: &str = "id-floor";

fn read_id_floor(dir: &Path) -> io::Result<u64> {
    match fs::read_to_string(dir.join(ID_FLOOR)) {
        // A torn or garbled file cannot be trusted to be above anything: the
        // round ids fall back to the clock and the markers' own check.
        Ok(s) => Ok(s.trim().parse().unwrap_or(0)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn io_err(dir: &Path) -> impl Fn(io::Error) -> SpoolError + Copy + '_ {
    move |source| SpoolError::Io {
        dir: dir.display().to_string(),
        source,
    }
}

struct Scan {
    rounds: u64,
    last_id: u64,
    good_bytes: u64,
    bad: Option<String>,
}

fn scan_segment(path: &Path) -> io::Result<Scan> {
    let mut r = BufReader::new(File::open(path)?);
    let mut scan = Scan {
        rounds: 0,
        last_id: 0,
        good_bytes: 0,
        bad: None,
    };
    loop {
        match read_frame(&mut r) {
            Ok(Ok(payload)) if payload.is_empty() => break,
            Ok(Ok(payload)) => match decode_round(&payload) {
                Ok(round) => {
                    scan.rounds += 1;
                    scan.last_id = scan.last_id.max(round.id);
                    scan.good_bytes += FRAME_HEADER + payload.len() as u64;
                }
                Err(e) => {
                    scan.bad = Some(e);
                    break;
                }
            },
            Ok(Err(e)) => {
                scan.bad = Some(e);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(scan)
}

/// The next frame's payload; an empty payload at a clean end of file; `Err` inside
/// for a torn or corrupt frame.
fn read_frame(r: &mut impl Read) -> io::Result<Result<Vec<u8>, String>> {
    let mut header = [0u8; FRAME_HEADER as usize];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..])? {
            0 if got == 0 => return Ok(Ok(Vec::new())),
            0 => return Ok(Err(format!("torn frame header ({got} of 8 bytes)"))),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > MAX_RECORD {
        return Ok(Err(format!("impossible record length {len}")));
    }
    let mut payload = vec![0u8; len];
    if let Err(e) = r.read_exact(&mut payload) {
        return if e.kind() == io::ErrorKind::UnexpectedEof {
            Ok(Err(format!("torn record ({len} bytes announced)")))
        } else {
            Err(e)
        };
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(Err("checksum mismatch".into()));
    }
    Ok(Ok(payload))
}

// Rounds as MessagePack, written and read with rmp directly: an array
// [id, [[key, [trim..], [[field, value, field, value..]..]]..]], values as bin.

fn encode_round(round: &Round) -> Vec<u8> {
    let mut out = Vec::new();
    let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    // Writes into a Vec cannot fail.
    let _ = rmp::encode::write_array_len(&mut out, 2);
    let _ = rmp::encode::write_uint(&mut out, round.id);
    let _ = rmp::encode::write_array_len(&mut out, len(round.appends.len()));
    for a in &round.appends {
        let _ = rmp::encode::write_array_len(&mut out, 3);
        let _ = rmp::encode::write_str(&mut out, &a.key);
        let _ = rmp::encode::write_array_len(&mut out, len(a.trim.len()));
        for t in &a.trim {
            let _ = rmp::encode::write_str(&mut out, t);
        }
        let _ = rmp::encode::write_array_len(&mut out, len(a.entries.len()));
        for e in &a.entries {
            let _ = rmp::encode::write_array_len(&mut out, len(e.len() * 2));
            for (f, v) in e {
                let _ = rmp::encode::write_str(&mut out, f);
                let _ = rmp::encode::write_bin(&mut out, v);
            }
        }
    }
    out
}

fn decode_round(mut b: &[u8]) -> Result<Round, String> {
    let r = &mut b;
    let bad = |what: &str| format!("round does not decode: {what}");
    let array = |r: &mut &[u8], what: &str| {
        rmp::decode::read_array_len(r)
            .map(|n| n as usize)
            .map_err(|_| bad(what))
    };
    let string = |r: &mut &[u8], what: &str| -> Result<String, String> {
        let n = rmp::decode::read_str_len(r).map_err(|_| bad(what))? as usize;
        let (s, rest) = r.split_at_checked(n).ok_or_else(|| bad(what))?;
        *r = rest;
        String::from_utf8(s.to_vec()).map_err(|_| bad(what))
    };
    if array(r, "round")? != 2 {
        return Err(bad("round"));
    }
    let id = rmp::decode::read_int(r).map_err(|_| bad("id"))?;
    let n = array(r, "appends")?;
    let mut appends = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        if array(r, "append")? != 3 {
            return Err(bad("append"));
        }
        let key = string(r, "key")?;
        let nt = array(r, "trim")?;
        let trim = (0..nt)
            .map(|_| string(r, "trim"))
            .collect::<Result<_, _>>()?;
        let ne = array(r, "entries")?;
        let mut entries = Vec::with_capacity(ne.min(4096));
        for _ in 0..ne {
            let nf = array(r, "entry")?;
            if nf % 2 != 0 {
                return Err(bad("entry"));
            }
            let mut fields = Vec::with_capacity(nf / 2);
            for _ in 0..nf / 2 {
                let f = string(r, "field")?;
                let vn = rmp::decode::read_bin_len(r).map_err(|_| bad("value"))? as usize;
                let (v, rest) = r.split_at_checked(vn).ok_or_else(|| bad("value"))?;
                *r = rest;
                fields.push((f, v.to_vec()));
            }
            entries.push(fields);
        }
        appends.push(Append { key, trim, entries });
    }
    if !r.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(Round { id, appends })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(id: u64, events: usize) -> Round {
        Round {
            id,
            appends: vec![
                Append {
                    key: "tg:raw:{0}".into(),
                    trim: Vec::new(),
                    entries: (0..events)
                        .map(|i| vec![("e".to_string(), format!("event {id}.{i}").into_bytes())])
                        .collect(),
                },
                Append {
                    key: "tg:dlq:ingest".into(),
                    trim: vec!["MAXLEN".into(), "~".into(), "10".into()],
                    entries: vec![vec![
                        ("reason".to_string(), b"bad".to_vec()),
                        ("payload".to_string(), vec![0, 1, 2, 255]),
                    ]],
                },
            ],
        }
    }

    fn config(dir: &Path) -> SpoolConfig {
        let mut c = SpoolConfig::new(dir);
        c.segment_bytes = 300;
        c
    }

    fn drain_all(spool: &mut Spool) -> Vec<Round> {
        let mut out = Vec::new();
        loop {
            let (rounds, cur) = spool.peek(2).expect("peek");
            if rounds.is_empty() {
                return out;
            }
            spool.consume(cur, rounds.len()).expect("consume");
            out.extend(rounds);
        }
    }

    #[test]
    fn rounds_come_back_in_order_across_segments_and_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written: Vec<Round> = (1..=7).map(|id| round(id, id as usize)).collect();
        {
            let mut spool = Spool::open(config(dir.path())).expect("open");
            for r in &written {
                spool.append(r).expect("append");
            }
            assert_eq!(spool.rounds(), 7);
            assert!(spool.segments.len() > 2, "small segments roll over");
            // Drain two, then "crash".
            let (first, cur) = spool.peek(2).expect("peek");
            assert_eq!(first, written[..2]);
            spool.consume(cur, 2).expect("consume");
        }
        let mut spool = Spool::open(config(dir.path())).expect("reopen");
        assert_eq!(spool.last_id(), 7);
        // Rounds of a segment drained only in part come back again after a
        // restart (the append script makes them no-ops); none is lost.
        let again = drain_all(&mut spool);
        let ids: Vec<u64> = again.iter().map(|r| r.id).collect();
        assert!(ids.ends_with(&[3, 4, 5, 6, 7]) && ids.len() <= 7, "{ids:?}");
        assert_eq!(again.last(), written.last());
        assert!(spool.is_empty());
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "spool"))
            .collect();
        assert!(left.is_empty(), "a drained spool leaves no segment");
    }

    #[test]
    fn a_torn_tail_is_cut_and_what_came_before_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 1 << 20;
        {
            let mut spool = Spool::open(cfg.clone()).expect("open");
            spool.append(&round(1, 2)).expect("append");
            spool.append(&round(2, 2)).expect("append");
        }
        let seg = dir.path().join(format!("{:016x}.spool", 1));
        let full = fs::metadata(&seg).expect("segment").len();
        // A crash in the middle of the second record's write.
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .and_then(|f| f.set_len(full - 5))
            .expect("truncate");
        let mut spool = Spool::open(cfg.clone()).expect("reopen");
        assert_eq!(drain_all(&mut spool), vec![round(1, 2)]);
        // And the spool takes appends again at a clean boundary.
        spool.append(&round(3, 1)).expect("append");
        drop(spool);
        let mut spool = Spool::open(cfg).expect("reopen");
        assert_eq!(drain_all(&mut spool), vec![round(3, 1)]);
    }

    #[test]
    fn a_flipped_bit_is_caught_by_the_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.segment_bytes = 1 << 20;
        {
            let mut spool = Spool::open(cfg.clone()).expect("open");
            spool.append(&round(1, 2)).expect("append");
        }
        let seg = dir.path().join(format!("{:016x}.spool", 1));
        let mut bytes = fs::read(&seg).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&seg, bytes).expect("write");
        let scan = scan_segment(&seg).expect("scan");
        assert_eq!(scan.rounds, 0);
        assert_eq!(scan.bad.as_deref(), Some("checksum mismatch"));
    }

    #[test]
    fn a_full_spool_refuses_with_a_clear_error_and_keeps_what_it_has() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = config(dir.path());
        cfg.max_bytes = 400;
        let mut spool = Spool::open(cfg).expect("open");
        spool.append(&round(1, 1)).expect("append");
        let err = loop {
            match spool.append(&round(spool.last_id() + 1, 1)) {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, SpoolError::Full { max: 400, .. }), "{err}");
        assert!(err.to_string().contains("spool is full"));
        let kept = spool.rounds() as usize;
        assert_eq!(drain_all(&mut spool).len(), kept);
    }

    #[test]
    fn a_second_process_cannot_open_the_same_spool() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Spool::open(config(dir.path())).expect("open");
        let second = Spool::open(config(dir.path()));
        assert!(matches!(second, Err(SpoolError::Locked { .. })));
    }

    #[test]
    fn garbage_never_decodes_as_a_round() {
        for junk in [
            &b""[..],
            b"\x92",
            b"\x92\x01\x91\x93\xa1k\x90\x91\x92\xa1e",
            b"\xff\xff",
        ] {
            assert!(decode_round(junk).is_err(), "{junk:?}");
        }
        let good = encode_round(&round(9, 3));
        for cut in 0..good.len() {
            assert!(decode_round(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode_round(&good), Ok(round(9, 3)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            crate::test_support::fuzz_cases(2_000)
        ))]

        /// Whatever a segment file holds, opening the spool neither panics nor
        /// hands out a record that fails its checksum or does not decode.
        #[test]
        fn any_segment_contents_open_safely(
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
            keep_valid in proptest::prelude::any::<bool>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut cfg = config(dir.path());
            cfg.segment_bytes = 1 << 20;
            if keep_valid {
                let mut spool = Spool::open(cfg.clone()).expect("open");
                spool.append(&round(1, 2)).expect("append");
            }
            let seg = dir.path().join(format!("{:016x}.spool", 1));
            let mut bytes = fs::read(&seg).unwrap_or_default();
            bytes.extend_from_slice(&junk);
            fs::write(&seg, &bytes).expect("write");
            let mut spool = Spool::open(cfg).expect("open");
            let rounds = drain_all(&mut spool);
            if keep_valid {
                proptest::prop_assert_eq!(rounds.first(), Some(&round(1, 2)));
            }
            for r in &rounds[usize::from(keep_valid)..] {
                // Junk that happens to frame and decode is a round; nothing else is.
                proptest::prop_assert_eq!(decode_round(&encode_round(r)), Ok(r.clone()));
            }
        }

        #[test]
        fn random_bytes_never_decode_into_a_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = decode_round(&bytes);
        }
    }
}
