//! The few bpf(2) commands the agent needs on maps whose layout it only
//! knows at run time (checking and migrating pinned maps of another
//! layout): aya's typed maps need the key and value types at compile time.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `BPF_MAP_LOOKUP_ELEM`.
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
/// `BPF_MAP_UPDATE_ELEM`.
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
/// `BPF_MAP_GET_NEXT_KEY`.
const BPF_MAP_GET_NEXT_KEY: libc::c_int = 4;
/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_int = 7;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_int = 15;
/// `BPF_LINK_TYPE_CGROUP`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `BPF_ANY`: create or replace.
const BPF_ANY: u64 = 0;

/// `union bpf_attr` for the map element commands.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_OBJ_GET`.
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Runs bpf(2) `cmd` on `attr`.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads or writes
/// through it.
unsafe fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> io::Result<libc::c_long> {
    let size = u32::try_from(std::mem::size_of::<T>()).map_err(io::Error::other)?;
    // SAFETY: `attr` is a live `bpf_attr` prefix of `size` bytes; the
    // caller vouches for the pointers inside it.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: `pathname` points at a NUL-terminated string that outlives
    // the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The key after `key` (the first key if `None`); `None` at the end.
pub fn next_key(map: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> io::Result<bool> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map)?,
        key: key.map_or(0, |k| k.as_ptr() as u64),
        value: next.as_mut_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: `key` (if any) and `next` are buffers of the map's key size,
    // live for the call (the caller sizes them from the map's info).
    match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Reads the value of `key` into `value`; false if there is none.
pub fn lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map)?,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: `key` and `value` are buffers of the map's key size and
    // (per-CPU) value size, live for the call.
    match unsafe { bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) } {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes `key` → `value`.
pub fn update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map)?,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: BPF_ANY,
        ..MapElemAttr::default()
    };
    // SAFETY: `key` and `value` are buffers of the map's key size and
    // (per-CPU) value size, live for the call; the kernel only reads them.
    unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// The cgroup id of a cgroup link (`None` for links of other types).
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<Option<u64>> {
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8
    // whose `cgroup` member starts with the cgroup id.
    let mut info = [0u64; 16];
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(link)?,
        info_len: u32::try_from(std::mem::size_of_val(&info)).map_err(io::Error::other)?,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: `info` is a zeroed buffer of `info_len` bytes, live for the
    // call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let link_type = u32::try_from(info[0] & 0xffff_ffff).map_err(io::Error::other)?;
    Ok((link_type == BPF_LINK_TYPE_CGROUP).then_some(info[2]))
}

fn fd_u32(fd: BorrowedFd<'_>) -> io::Result<u32> {
    u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)
}
