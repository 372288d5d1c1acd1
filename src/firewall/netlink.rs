//! Removing the table over nfnetlink, for a daemon that has dropped to its
//! user: an `nft` child would start without capabilities (ambient is empty and
//! `no_new_privs` is set), but the daemon itself keeps `CAP_NET_ADMIN`, which
//! is all a netlink `NFT_MSG_DELTABLE` needs. The message is built by a pure
//! function ([`deltable_batch`]); only [`delete_table`] touches a socket.

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_DELTABLE: u16 = 2;
const NFTA_TABLE_NAME: u16 = 1;
const NFPROTO_INET: u8 = 1;
/// Sequence number of the delete message (the one acknowledged).
const DELETE_SEQ: u32 = 2;

/// One netlink message: header, nfgenmsg, attributes (already padded).
fn message(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    attrs: &[u8],
) {
    let len = (NLMSG_HDRLEN + NFGENMSG_LEN + attrs.len()) as u32;
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
}

/// The batch `BEGIN, DELTABLE inet NAME (ack requested), END`, as `nft
/// delete table inet NAME` sends it.
pub fn deltable_batch(table: &str) -> Vec<u8> {
    let mut name = table.as_bytes().to_vec();
    name.push(0);
    let mut attr = Vec::new();
    attr.extend_from_slice(&((4 + name.len()) as u16).to_ne_bytes());
    attr.extend_from_slice(&NFTA_TABLE_NAME.to_ne_bytes());
    attr.extend_from_slice(&name);
    while attr.len() % 4 != 0 {
        attr.push(0);
    }
    let mut out = Vec::new();
    let subsys = NFNL_SUBSYS_NFTABLES;
    message(
        &mut out,
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        1,
        0,
        subsys,
        &[],
    );
    message(
        &mut out,
        (subsys << 8) | NFT_MSG_DELTABLE,
        NLM_F_REQUEST | NLM_F_ACK,
        DELETE_SEQ,
        NFPROTO_INET,
        0,
        &attr,
    );
    message(
        &mut out,
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        3,
        0,
        subsys,
        &[],
    );
    out
}

/// The errno of the kernel's answer to the delete (0: done), if `reply`
/// holds its `NLMSG_ERROR` acknowledgement.
pub fn ack_errno(reply: &[u8]) -> Option<i32> {
    let mut rest = reply;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        if kind == NLMSG_ERROR && seq == DELETE_SEQ && len >= NLMSG_HDRLEN + 4 {
            let e = i32::from_ne_bytes(rest[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].try_into().ok()?);
            return Some(-e);
        }
        rest = &rest[(len + 3) & !3..];
    }
    None
}

/// Deletes table `inet TABLE`; a table that is already gone is not an error.
///
/// # Errors
/// The socket cannot be used, the kernel refuses (EPERM without
/// `CAP_NET_ADMIN`), or no answer comes within a second.
pub fn delete_table(table: &str) -> std::io::Result<()> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )?;
    let timeout = nix::sys::time::TimeVal::from(libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    });
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    let kernel = NetlinkAddr::new(0, 0);
    let batch = deltable_batch(table);
    sendto(fd.as_raw_fd(), &batch, &kernel, MsgFlags::empty())?;
    let mut buf = vec![0u8; 8192];
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        match ack_errno(&buf[..n]) {
            Some(0) | Some(libc::ENOENT) => return Ok(()),
            Some(e) => return Err(std::io::Error::from_raw_os_error(e)),
            None => continue,
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no netlink answer to the table removal",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The batch is three messages; the delete carries the family, the
    /// NUL-terminated name padded to 4 bytes, and asks for an ack.
    #[test]
    fn batch_layout() {
        let b = deltable_batch("sitegate");
        assert_eq!(b.len(), 20 + (20 + 4 + 12) + 20);
        let del = &b[20..56];
        assert_eq!(u32::from_ne_bytes(del[0..4].try_into().unwrap()), 36);
        assert_eq!(u16::from_ne_bytes(del[4..6].try_into().unwrap()), 0x0a02);
        assert_eq!(u16::from_ne_bytes(del[6..8].try_into().unwrap()), 0x5);
        assert_eq!(del[16], NFPROTO_INET);
        assert_eq!(&del[24..33], b"sitegate\0");
        assert_eq!(u16::from_ne_bytes(b[4..6].try_into().unwrap()), 0x10);
        assert_eq!(&b[18..20], &10u16.to_be_bytes());
    }

    /// The acknowledgement of the delete is found by type and sequence.
    #[test]
    fn ack_parsing() {
        let mut reply = Vec::new();
        let ack = |errno: i32, seq: u32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&(-errno).to_ne_bytes());
            m.extend_from_slice(&[0u8; 16]);
            m
        };
        reply.extend(ack(0, 7));
        reply.extend(ack(libc::EPERM, DELETE_SEQ));
        assert_eq!(ack_errno(&reply), Some(libc::EPERM));
        assert_eq!(ack_errno(&ack(0, DELETE_SEQ)), Some(0));
        assert_eq!(ack_errno(&reply[..10]), None);
    }
}
