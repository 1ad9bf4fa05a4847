//! The HTTP plumbing's contract, run on both wires: HTTP/1.1 over real TCP in the std build,
//! values over simulated channels under madsim.

use super::*;
use axum::extract::{Extension, Request as AxumRequest};
use axum::routing::post;
use std::sync::atomic::{AtomicBool, Ordering};

#[test]
fn urls_split_into_address_and_path() {
    let (a, p) = parse_url("http://10.0.0.1:8080/agent/callback/x").unwrap();
    assert_eq!(a, "10.0.0.1:8080".parse().unwrap());
    assert_eq!(p, "/agent/callback/x");
    assert_eq!(parse_url("http://10.0.0.1:80").unwrap().1, "/");
    assert!(parse_url("https://10.0.0.1:80/").is_err());
    assert!(parse_url("http://host.example:80/").is_err());
}

/// Sets its flag when dropped: shows whether a handler ran to its end or was dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn app(dropped: Arc<AtomicBool>) -> Router {
    Router::new()
        .route(
            "/echo",
            post(
                |Extension(name): Extension<String>, req: AxumRequest| async move {
                    let header = req
                        .headers()
                        .get("x-test")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let body = axum::body::to_bytes(req.into_body(), usize::MAX)
                        .await
                        .unwrap_or_default();
                    let text = format!("{name} {header} {}", String::from_utf8_lossy(&body));
                    (axum::http::StatusCode::CREATED, text)
                },
            ),
        )
        .route(
            "/hang",
            post(move || async move {
                let _guard = SetOnDrop(dropped);
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "late"
            }),
        )
}

async fn server(dropped: Arc<AtomicBool>) -> SocketAddr {
    spawn_server_with(
        "127.0.0.1:0".parse().unwrap(),
        app(dropped),
        "server-a".to_string(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn an_answer_carries_status_body_and_what_the_request_sent() {
    let addr = server(Arc::default()).await;
    let c = HttpClient::default();
    let r = c
        .post(
            addr,
            "/echo",
            &[("x-test", "h1")],
            "b1",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert!(r.is_success());
    assert_eq!(&r.body[..], b"server-a h1 b1");
    let r = c
        .post_url(
            &format!("http://{addr}/nowhere"),
            &[],
            "",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_connection_is_reused_and_closed_once_idle() {
    let addr = server(Arc::default()).await;
    let c = HttpClient::with_idle_timeout(4, Duration::from_millis(200));
    for i in 0..3 {
        let r = c
            .post(addr, "/echo", &[], format!("{i}"), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(r.body, format!("server-a  {i}"));
        assert_eq!(c.idle_connections(), 1, "one connection, reused");
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(c.idle_connections(), 0);
    let r = c
        .post(addr, "/echo", &[], "again", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(c.idle_connections(), 1);
}

#[tokio::test]
async fn the_reaper_closes_what_was_put_back_by_the_cutoff_and_nothing_newer() {
    let t0 = tokio::time::Instant::now();
    let at = |ms| t0 + Duration::from_millis(ms);
    let (a, b): (SocketAddr, SocketAddr) =
        ("10.0.0.1:1".parse().unwrap(), "10.0.0.2:1".parse().unwrap());
    let mut idle = Idle::<u32>::default();
    // Put back in time order, as `put_idle` does: a at 0 and 20, b at 10 and 30; the one of a
    // put back at 20 was then taken again (its order entry stays and finds nothing).
    for (conn, ms, addr) in [(1, 0, a), (2, 10, b), (3, 20, a), (4, 30, b)] {
        idle.conns.entry(addr).or_default().push((conn, at(ms)));
        idle.order.push_back((at(ms), addr));
    }
    idle.conns.get_mut(&a).unwrap().pop();
    let left = |idle: &Idle<u32>| {
        let mut v: Vec<u32> = idle.conns.values().flatten().map(|(c, _)| *c).collect();
        v.sort();
        v
    };
    idle.close_older(at(5));
    assert_eq!(left(&idle), [2, 4]);
    assert!(
        !idle.conns.contains_key(&a),
        "an address with nothing idle is dropped"
    );
    idle.close_older(at(25));
    assert_eq!(left(&idle), [4], "the one put back at 10 went, at 30 stays");
    assert_eq!(idle.order.len(), 1);
    idle.close_older(at(30));
    assert!(idle.conns.is_empty() && idle.order.is_empty());
}

#[tokio::test]
async fn nobody_listening_is_a_connect_error() {
    // Bind a server, learn its port, and talk to the next one, which nobody serves.
    let addr = server(Arc::default()).await;
    let nobody = SocketAddr::new(addr.ip(), addr.port().wrapping_add(1).max(1));
    let e = HttpClient::default()
        .post(nobody, "/echo", &[], "", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(
        matches!(e, HttpError::Connect(a, _) if a == nobody),
        "{e:?}"
    );
}

#[tokio::test]
async fn a_request_past_its_timeout_fails_and_its_handler_is_dropped() {
    let dropped = Arc::new(AtomicBool::new(false));
    let addr = server(dropped.clone()).await;
    let c = HttpClient::default();
    let e = c
        .post(addr, "/hang", &[], "", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(e, HttpError::Timeout(a, 300) if a == addr),
        "{e:?}"
    );
    assert_eq!(
        c.idle_connections(),
        0,
        "a timed-out connection is not reused"
    );
    // The client closed the connection; the server notices and drops the handler.
    for _ in 0..100 {
        if dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dropped.load(Ordering::SeqCst), "handler still running");
    let r = c
        .post(addr, "/echo", &[], "after", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(&r.body[..], b"server-a  after");
}

/// Reads one HTTP/1.1 request (head and `content-length` body) off a raw connection.
#[cfg(not(madsim))]
fn read_request(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_lowercase();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

#[cfg(not(madsim))]
fn answer(s: &mut std::net::TcpStream, body: &str) {
    use std::io::Write;
    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
}

/// Sends `b` on a kept connection that its server closed after answering `a`, before the
/// client's connection task could see it close (the one runtime thread is blocked meanwhile);
/// the server answers on a second connection, if one comes. Returns the answer to `b`, and the
/// server's listener once it is done.
#[cfg(not(madsim))]
async fn send_on_closed_kept_connection(
    headers: &[(&'static str, &str)],
) -> (Result<HttpResponse, HttpError>, std::net::TcpListener) {
    use std::sync::mpsc::channel;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, close_rx) = channel::<()>();
    let (closed_tx, closed_rx) = channel::<()>();
    let (sent_tx, sent_rx) = channel::<bool>();
    let server = std::thread::spawn(move || {
        let (mut first, _) = listener.accept().unwrap();
        let got = read_request(&mut first);
        answer(&mut first, &format!("first connection: {got}"));
        close_rx.recv().unwrap();
        drop(first);
        closed_tx.send(()).unwrap();
        // The client says whether a second connection should come; then the listener is
        // handed back to look for others.
        if sent_rx.recv().unwrap() {
            let (mut second, _) = listener.accept().unwrap();
            let got = read_request(&mut second);
            answer(&mut second, &format!("second connection: {got}"));
        }
        listener
    });
    let c = HttpClient::default().with_replay_key(TASK);
    let r = c
        .post(addr, "/x", headers, "a", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(&r.body[..], b"first connection: a");
    assert_eq!(c.idle_connections(), 1);
    close_tx.send(()).unwrap();
    closed_rx.recv().unwrap();
    let replayable = !headers.is_empty();
    sent_tx.send(replayable).unwrap();
    let r = c
        .post(addr, "/x", headers, "b", Duration::from_secs(10))
        .await;
    (r, server.join().unwrap())
}

/// The client's replay key in these tests, as the agent protocol's task id is for its clients.
#[cfg(not(madsim))]
const TASK: &str = "x-test-task";

/// A command (it carries a task id: a repeat is harmless) that finds its kept connection closed
/// goes again on a new one.
#[cfg(not(madsim))]
#[tokio::test]
async fn a_command_that_finds_its_kept_connection_closed_goes_again_on_a_new_one() {
    let (r, _) = send_on_closed_kept_connection(&[(TASK, "t1")]).await;
    assert_eq!(&r.unwrap().body[..], b"second connection: b");
}

/// A POST without a key that makes a repeat harmless, written on a connection that then turned
/// out closed, fails and is not sent again: the client cannot tell whether its server read it.
#[cfg(not(madsim))]
#[tokio::test]
async fn a_post_without_a_key_is_not_sent_again() {
    let (r, listener) = send_on_closed_kept_connection(&[]).await;
    assert!(matches!(r, Err(HttpError::Request(..))), "{r:?}");
    listener.set_nonblocking(true).unwrap();
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the client connected again"
    );
}

/// A request that left on a kept connection whose server then closed it without an answer
/// fails, and is not sent again (its server may have acted on it).
#[cfg(not(madsim))]
#[tokio::test]
async fn a_request_that_left_is_not_sent_again() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        read_request(&mut conn);
        answer(&mut conn, "ok");
        read_request(&mut conn);
        drop(conn);
        listener
    });
    let c = HttpClient::default();
    let r = c
        .post(addr, "/x", &[], "a", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(&r.body[..], b"ok");
    let e = c
        .post(addr, "/x", &[], "b", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(matches!(e, HttpError::Request(a, _) if a == addr), "{e:?}");
    let listener = server.join().unwrap();
    listener.set_nonblocking(true).unwrap();
    assert_eq!(
        listener.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "the client connected again"
    );
}
