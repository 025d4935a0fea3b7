//! # passerelle-mllp: the MLLP transport
//!
//! Hospitals send HL7 v2 over MLLP (HL7 v2.5.1 appendix C): each message framed as
//! `0x0B message 0x1C 0x0D` on a TCP (or TLS) connection, each answered by an ACK on the
//! same connection. This crate is passerelle's front door and its outbound MLLP leg:
//!
//! - [`codec`]: the framing, a `tokio_util` [`Decoder`](tokio_util::codec::Decoder) /
//!   [`Encoder`](tokio_util::codec::Encoder) pair with a frame size limit, a bound on the
//!   bytes skipped between frames, and each tolerated sender quirk a named, documented,
//!   counted option (missing CR after `0x1C`, NULs between frames, garbage before `0x0B`).
//! - [`listener`]: TCP or TLS (rustls, optional mutual TLS with an identity allow-list,
//!   certificates reloaded without restart), an IP allow-list, global and per-IP
//!   connection caps, handshake/idle/frame/write deadlines, keepalive, graceful shutdown.
//!   Each frame goes to a [`Handler`], which returns the ACK.
//! - [`client`]: sends a message, waits for its ACK within a deadline, and checks that
//!   the ACK answers that message; reconnects with backoff.
//! - [`handler::ParseAckHandler`]: a handler that answers from the parser alone.
//!
//! ## Invariants
//!
//! - **The ACK comes from the handler, after it returns.** The listener never
//!   acknowledges on its own, so a durable store behind [`Handler::handle`] gives "no
//!   ACK before durability" for free. The only answers the listener writes itself are
//!   NAKs (AR) for frames it refuses (over the size limit).
//! - **In order.** Per connection, frames reach the handler one at a time in arrival
//!   order, and ACKs leave in that order, so pipelining senders match them up.
//! - **Bounded.** Every buffer, count and wait has a limit: frame size, skipped bytes,
//!   connections, handshake, idle time, time to complete a frame, time to write an ACK,
//!   time to drain on shutdown. A peer that breaks a limit loses its own connection,
//!   nobody else's.
//! - **Nothing silent, nothing private.** Every refusal and every tolerated deviation is
//!   logged (tracing) and counted ([`listener::Stats`]); logs carry addresses, control
//!   ids, types, sizes and states, never message content. Bad input never panics.
//! - **Matched ACKs.** The client accepts an ACK only when its MSA-2 equals the sent
//!   MSH-10, and closes the connection after a timeout so that a late ACK can never be
//!   taken for the next message's.

pub mod client;
pub mod codec;
pub mod handler;
pub mod listener;
pub mod tls;

pub use client::{Ack, Client, ClientConfig, ClientError};
pub use codec::{CodecOptions, Frame, FrameError, MllpCodec, Tolerated, Unframed, UnframedKind};
pub use handler::ParseAckHandler;
pub use listener::{Cidr, Handler, Listener, ListenerConfig, PeerInfo, RunningListener, Stats};
pub use tls::{ClientTlsConfig, PeerIdentity, ServerTls, ServerTlsConfig, TlsError};
