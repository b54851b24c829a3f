//! cutfs: an in-memory FUSE filesystem that can lose power.
//!
//! A SIGKILL keeps the page cache, so it cannot show what a power cut loses. cutfs keeps, for
//! every file, the data as of its last `fsync`/`fdatasync` and the writes made since; and for
//! every directory, its entries as of its last `fsync`. On command it "cuts the power":
//!
//! - `freeze`: every later operation fails with EIO, as a disk that lost power (the test then
//!   SIGKILLs the processes using the filesystem);
//! - `cut SEED`: the filesystem is rebuilt from what was made durable: directory entries as of
//!   each directory's last fsync, file data as of each file's last fsync, plus a random part of
//!   the writes made since (chosen with SEED): a random subset of the 4 KiB pages written inside
//!   the durable size (the device may reorder them), and a random prefix of the writes that
//!   extended the file (so no hole appears). Then it thaws.
//! - `lose-all`: as `cut`, but no unsynced write survives.
//! - `full`: the disk is full, as a copy-on-write filesystem (btrfs, f2fs) is: every write, every
//!   growth and every new file or directory fails with ENOSPC (an overwrite needs a new block
//!   too), and `statfs` reports no free block. Reads, fsync, unlink and rename still work.
//!   `space` frees it again.
//!
//! Commands come one per line on stdin; each is answered `ok` on stdout. Files are opened with
//! direct I/O and attributes are never cached, so after a cut every read sees the new state.
//!
//! This is stricter than ext4 (which also commits a new file's directory entry when the file is
//! fsynced): a program that survives cutfs does not rely on anything POSIX does not promise.
//!
//! Usage: `cutfs MOUNTPOINT` (as root; unmount with `umount MOUNTPOINT`).

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

const PAGE: u64 = 4096;

#[derive(Debug, Clone)]
enum Pending {
    /// A write inside the durable size: its pages may survive in any subset.
    Inside {
        offset: u64,
        data: Vec<u8>,
    },
    /// A write at or past the durable size: kept only as an ordered prefix.
    Extend {
        offset: u64,
        data: Vec<u8>,
    },
    Truncate(u64),
}

#[derive(Debug, Clone)]
enum Body {
    File { data: Vec<u8>, durable: Vec<u8>, pending: Vec<Pending> },
    Dir { entries: BTreeMap<OsString, u64>, durable: BTreeMap<OsString, u64> },
}

#[derive(Debug, Clone)]
struct Node {
    body: Body,
    perm: u16,
    mtime: SystemTime,
}

#[derive(Debug)]
struct State {
    nodes: HashMap<u64, Node>,
    next: u64,
    frozen: bool,
    /// `full`: writes fail with ENOSPC.
    full: bool,
    /// Counters, printed with each answer.
    fsyncs: u64,
    cuts: u64,
}

/// A small deterministic generator (xorshift64*), so a cut is reproducible from its seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

fn apply(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(bytes);
}

impl State {
    fn new() -> State {
        let mut nodes = HashMap::new();
        nodes.insert(
            1,
            Node {
                body: Body::Dir { entries: BTreeMap::new(), durable: BTreeMap::new() },
                perm: 0o755,
                mtime: SystemTime::now(),
            },
        );
        State { nodes, next: 2, frozen: false, full: false, fsyncs: 0, cuts: 0 }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.nodes.get(&ino)?;
        let (kind, size, nlink) = match &n.body {
            Body::File { data, .. } => (FileType::RegularFile, data.len() as u64, 1),
            Body::Dir { .. } => (FileType::Directory, 0, 2),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind,
            perm: n.perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn entries(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::Dir { entries, .. }) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn add(&mut self, parent: u64, name: &OsStr, body: Body, perm: u16) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, Node { body, perm, mtime: SystemTime::now() });
        self.entries(parent)?.insert(name.to_os_string(), ino);
        Ok(ino)
    }

    /// Add a new, empty file or directory; its attributes.
    fn create_node(&mut self, parent: u64, name: &OsStr, dir: bool, mode: u32) -> Result<FileAttr, Errno> {
        let body = if dir {
            Body::Dir { entries: BTreeMap::new(), durable: BTreeMap::new() }
        } else {
            Body::File { data: Vec::new(), durable: Vec::new(), pending: Vec::new() }
        };
        let ino = self.add(parent, name, body, (mode & 0o7777) as u16)?;
        self.attr(ino).ok_or(Errno::EIO)
    }

    /// The power cut: rebuild from what was durable (plus, with `rng`, some unsynced writes).
    fn cut(&mut self, mut rng: Option<Rng>) {
        // Reachable from the root through durable entries only.
        let mut keep = vec![1u64];
        let mut i = 0;
        while i < keep.len() {
            if let Some(Node { body: Body::Dir { durable, .. }, .. }) = self.nodes.get(&keep[i]) {
                keep.extend(durable.values().copied());
            }
            i += 1;
        }
        let keep: std::collections::HashSet<u64> = keep.into_iter().collect();
        self.nodes.retain(|ino, _| keep.contains(ino));
        for n in self.nodes.values_mut() {
            match &mut n.body {
                Body::Dir { entries, durable } => *entries = durable.clone(),
                Body::File { data, durable, pending } => {
                    let mut d = durable.clone();
                    if let Some(rng) = rng.as_mut() {
                        let mut extending = true;
                        for p in pending.iter() {
                            match p {
                                Pending::Inside { offset, data } => {
                                    // Any subset of its pages.
                                    let mut at = 0usize;
                                    while at < data.len() {
                                        let page_end = (((*offset + at as u64) / PAGE + 1) * PAGE - offset) as usize;
                                        let end = page_end.min(data.len());
                                        if rng.coin() {
                                            apply(&mut d, offset + at as u64, &data[at..end]);
                                        }
                                        at = end;
                                    }
                                }
                                Pending::Extend { offset, data } => {
                                    // An ordered prefix: once one is lost, the rest are too.
                                    if extending && rng.coin() {
                                        apply(&mut d, *offset, data);
                                    } else {
                                        extending = false;
                                    }
                                }
                                Pending::Truncate(len) => {
                                    if rng.coin() {
                                        d.resize(*len as usize, 0);
                                    }
                                }
                            }
                        }
                    }
                    *data = d.clone();
                    *durable = d;
                    pending.clear();
                }
            }
        }
        self.frozen = false;
        self.cuts += 1;
    }
}

struct CutFs(Arc<Mutex<State>>);

const TTL: Duration = Duration::ZERO;

impl CutFs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Refuse with ENOSPC while the disk is `full`.
macro_rules! room {
    ($s:expr, $reply:expr) => {
        if $s.full {
            $reply.error(Errno::ENOSPC);
            return;
        }
    };
}

macro_rules! live {
    ($s:expr, $reply:expr) => {
        if $s.frozen {
            $reply.error(Errno::EIO);
            return;
        }
    };
}

impl Filesystem for CutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        live!(s, reply);
        let ino = match s.entries(parent.0) {
            Ok(e) => e.get(name).copied(),
            Err(e) => return reply.error(e),
        };
        match ino.and_then(|i| s.attr(i)) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.state();
        live!(s, reply);
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        live!(s, reply);
        let full = s.full;
        let Some(n) = s.nodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        if let Some(m) = mode {
            n.perm = (m & 0o7777) as u16;
        }
        if let Some(len) = size {
            match &mut n.body {
                Body::File { data, .. } if full && len > data.len() as u64 => return reply.error(Errno::ENOSPC),
                Body::File { data, pending, .. } => {
                    data.resize(len as usize, 0);
                    pending.push(Pending::Truncate(len));
                    n.mtime = SystemTime::now();
                }
                Body::Dir { .. } => return reply.error(Errno::EISDIR),
            }
        }
        match s.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let mut s = self.state();
        live!(s, reply);
        room!(s, reply);
        match s.create_node(parent.0, name, true, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        live!(s, reply);
        room!(s, reply);
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        match s.create_node(parent.0, name, false, mode) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        live!(s, reply);
        room!(s, reply);
        match s.create_node(parent.0, name, false, mode) {
            Ok(a) => reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        live!(s, reply);
        let ino = match s.entries(parent.0) {
            Ok(e) => e.remove(name),
            Err(e) => return reply.error(e),
        };
        match ino {
            // The node stays until a cut (open handles keep working); only the entry goes.
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        live!(s, reply);
        let Some(ino) = s.entries(parent.0).ok().and_then(|e| e.get(name).copied()) else {
            return reply.error(Errno::ENOENT);
        };
        match s.entries(ino) {
            Ok(e) if !e.is_empty() => return reply.error(Errno::ENOTEMPTY),
            Ok(_) => {}
            Err(e) => return reply.error(e),
        }
        if let Ok(e) = s.entries(parent.0) {
            e.remove(name);
        }
        reply.ok();
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        live!(s, reply);
        let ino = match s.entries(parent.0) {
            Ok(e) => e.remove(name),
            Err(e) => return reply.error(e),
        };
        let Some(ino) = ino else { return reply.error(Errno::ENOENT) };
        match s.entries(newparent.0) {
            Ok(e) => {
                e.insert(newname.to_os_string(), ino);
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = self.state();
        live!(s, reply);
        if s.nodes.contains_key(&ino.0) {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = self.state();
        live!(s, reply);
        match s.nodes.get(&ino.0).map(|n| &n.body) {
            Some(Body::File { data, .. }) => {
                let start = (offset as usize).min(data.len());
                let end = (start + size as usize).min(data.len());
                reply.data(&data[start..end]);
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        live!(s, reply);
        room!(s, reply);
        let Some(n) = s.nodes.get_mut(&ino.0) else { return reply.error(Errno::ENOENT) };
        match &mut n.body {
            Body::File { data, durable, pending } => {
                let p = if offset + bytes.len() as u64 <= durable.len() as u64 {
                    Pending::Inside { offset, data: bytes.to_vec() }
                } else {
                    Pending::Extend { offset, data: bytes.to_vec() }
                };
                pending.push(p);
                apply(data, offset, bytes);
                n.mtime = SystemTime::now();
                reply.written(bytes.len() as u32);
            }
            Body::Dir { .. } => reply.error(Errno::EISDIR),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // close() is not a sync.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        live!(s, reply);
        s.fsyncs += 1;
        match s.nodes.get_mut(&ino.0).map(|n| &mut n.body) {
            Some(Body::File { data, durable, pending }) => {
                *durable = data.clone();
                pending.clear();
                reply.ok();
            }
            Some(Body::Dir { entries, durable }) => {
                *durable = entries.clone();
                reply.ok();
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = self.state();
        live!(s, reply);
        match s.nodes.get(&ino.0).map(|n| &n.body) {
            Some(Body::Dir { .. }) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut s = self.state();
        live!(s, reply);
        let entries: Vec<(OsString, u64)> = match s.entries(ino.0) {
            Ok(e) => e.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            Err(e) => return reply.error(e),
        };
        let mut all = vec![(OsString::from("."), ino.0), (OsString::from(".."), 1)];
        all.extend(entries);
        for (i, (name, child)) in all.into_iter().enumerate().skip(offset as usize) {
            let kind = match s.nodes.get(&child).map(|n| &n.body) {
                Some(Body::Dir { .. }) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            if reply.add(INodeNo(child), (i + 1) as u64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        live!(s, reply);
        s.fsyncs += 1;
        match s.nodes.get_mut(&ino.0).map(|n| &mut n.body) {
            Some(Body::Dir { entries, durable }) => {
                *durable = entries.clone();
                reply.ok();
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let free = if self.state().full { 0 } else { 1 << 19 };
        reply.statfs(1 << 20, free, free, 1 << 16, 1 << 15, PAGE as u32, 255, PAGE as u32);
    }
}

fn main() {
    let Some(mountpoint) = std::env::args_os().nth(1) else {
        eprintln!("usage: cutfs MOUNTPOINT   (commands on stdin: freeze | cut SEED | lose-all | full | space)");
        std::process::exit(2);
    };
    let state = Arc::new(Mutex::new(State::new()));
    let mut cfg = Config::default();
    cfg.mount_options.extend([MountOption::FSName("cutfs".into()), MountOption::DefaultPermissions]);
    let session = match fuser::spawn_mount(CutFs(state.clone()), &mountpoint, &cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cutfs: mount {}: {e}", mountpoint.to_string_lossy());
            std::process::exit(1);
        }
    };
    println!("mounted");
    let _ = std::io::stdout().flush();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut words = line.split_whitespace();
        let answer = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            match (words.next(), words.next()) {
                (Some("freeze"), _) => {
                    s.frozen = true;
                    "ok".to_string()
                }
                (Some("cut"), Some(seed)) => match seed.parse::<u64>() {
                    Ok(seed) => {
                        s.cut(Some(Rng(seed | 1)));
                        format!("ok cuts={} fsyncs={}", s.cuts, s.fsyncs)
                    }
                    Err(_) => "error: cut SEED (a number)".into(),
                },
                (Some("lose-all"), _) => {
                    s.cut(None);
                    format!("ok cuts={} fsyncs={}", s.cuts, s.fsyncs)
                }
                (Some("full"), _) => {
                    s.full = true;
                    "ok".to_string()
                }
                (Some("space"), _) => {
                    s.full = false;
                    "ok".to_string()
                }
                (Some("quit"), _) => break,
                _ => format!("error: unknown command `{line}`"),
            }
        };
        println!("{answer}");
        let _ = std::io::stdout().flush();
    }
    drop(session);
}
