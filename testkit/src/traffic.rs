//! Real traffic for the enforcement tests: servers that answer requests, over TCP or UDP, on a
//! socket of a chosen namespace, and the clients' requests from a chosen source address.
//!
//! Every wait is bounded, and its length never decides a verdict: a packet the firewall drops
//! never gets an answer however long one waits, and one it lets through is answered at once
//! over a veth pair. So a probe waits [`patience`]: long when an answer is expected (a loaded
//! machine is slow, not wrong), short when none is (the test pays that wait on every blocked
//! probe).

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::NamedNetns;

/// How long a server's blocking calls wait before they look whether to stop.
const SERVER_TICK: Duration = Duration::from_millis(100);

/// How long to wait for an answer: 5 s when one is expected, 500 ms when none is.
pub fn patience(answer_expected: bool) -> Duration {
    if answer_expected { Duration::from_secs(5) } else { Duration::from_millis(500) }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A TCP connection from `from` (an address of the calling thread's namespace) to `to`, within
/// `wait`.
pub fn connect(from: IpAddr, to: SocketAddr, wait: Duration) -> io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::for_address(to), socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), wait)?;
    Ok(s.into())
}

/// Sends `request` from `from` (an address of `ns`, the calling thread's namespace for `None`)
/// to `to` and returns the answer, `None` when none came within `wait`: the connection, the
/// datagram or the answer was dropped, or the connection was refused or reset.
pub fn request(
    ns: Option<&NamedNetns>,
    proto: Proto,
    from: IpAddr,
    to: SocketAddr,
    request: &str,
    wait: Duration,
) -> Option<String> {
    let Some(ns) = ns else { return request_here(proto, from, to, request, wait) };
    let request = request.to_string();
    ns.run_in(move || request_here(proto, from, to, &request, wait))
}

fn request_here(proto: Proto, from: IpAddr, to: SocketAddr, request: &str, wait: Duration) -> Option<String> {
    match proto {
        Proto::Tcp => {
            let mut s = connect(from, to, wait).ok()?;
            s.write_all(request.as_bytes()).ok()?;
            receive(&mut s, wait)
        }
        Proto::Udp => {
            let s = UdpSocket::bind(SocketAddr::new(from, 0)).ok()?;
            s.send_to(request.as_bytes(), to).ok()?;
            s.set_read_timeout(Some(wait)).ok()?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
    }
}

/// One answer on `s` within `wait`.
fn receive(s: &mut TcpStream, wait: Duration) -> Option<String> {
    s.set_read_timeout(Some(wait)).ok()?;
    let mut buf = [0u8; 512];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

/// A TCP connection kept open across several requests: an established flow.
pub struct Connection(TcpStream);

impl Connection {
    /// Opens it from `from` (an address of `ns`) to `to`, within `wait`.
    pub fn open(ns: &NamedNetns, from: IpAddr, to: SocketAddr, wait: Duration) -> Option<Connection> {
        ns.run_in(move || connect(from, to, wait).ok()).map(Connection)
    }

    /// Sends `request` and returns the answer, `None` when none came within `wait`. A request
    /// that got none stays in flight: TCP retransmits it, and [`Connection::answer`] reads what
    /// comes of it.
    pub fn ask(&mut self, request: &str, wait: Duration) -> Option<String> {
        self.0.write_all(request.as_bytes()).ok()?;
        self.answer(wait)
    }

    /// The answer to the request in flight, `None` when none came within `wait`.
    pub fn answer(&mut self, wait: Duration) -> Option<String> {
        receive(&mut self.0, wait)
    }
}

/// A server answering each TCP read or UDP datagram with `<banner> <what it read>`, on a socket
/// bound in `ns` (the calling thread's namespace for `None`); stops when dropped.
pub struct Responder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Responder {
    /// Binds `addr` in `ns` (sockets keep the namespace they were created in, whichever thread
    /// then serves them) and serves it on a thread of its own.
    pub fn start(ns: Option<&NamedNetns>, proto: Proto, addr: SocketAddr, banner: &str) -> Responder {
        let bind = move || -> Server {
            match proto {
                Proto::Tcp => {
                    Server::Tcp(TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}")))
                }
                Proto::Udp => {
                    Server::Udp(UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}")))
                }
            }
        };
        let server = match ns {
            Some(ns) => ns.run_in(bind),
            None => bind(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (banner, flag) = (banner.to_string(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || server.serve(&banner, &flag));
        Responder { stop, thread: Some(thread) }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Server {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Server {
    fn serve(self, banner: &str, stop: &Arc<AtomicBool>) {
        match self {
            Server::Tcp(listener) => {
                // SO_RCVTIMEO bounds accept(2) too, so the loop sees `stop`.
                socket2::SockRef::from(&listener).set_read_timeout(Some(SERVER_TICK)).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((stream, _)) = listener.accept() {
                        let (banner, stop) = (banner.to_string(), Arc::clone(stop));
                        std::thread::spawn(move || answer_stream(stream, &banner, &stop));
                    }
                }
            }
            Server::Udp(socket) => {
                socket.set_read_timeout(Some(SERVER_TICK)).unwrap();
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&answer(banner, &buf[..n]), peer);
                    }
                }
            }
        }
    }
}

/// Answers every read on one connection until it closes or the server stops.
fn answer_stream(mut stream: TcpStream, banner: &str, stop: &AtomicBool) {
    stream.set_read_timeout(Some(SERVER_TICK)).unwrap();
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&answer(banner, &buf[..n])).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn answer(banner: &str, request: &[u8]) -> Vec<u8> {
    [banner.as_bytes(), b" ", request].concat()
}
