//! A small HTTP/1.1 receiver that records every request it gets (method,
//! path, headers, body) and answers with a status the test chooses. It can
//! be taken down (connections refused) and brought back on the same port,
//! like a webhook endpoint that goes away for a while.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, Ordering},
    },
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};

/// One request as received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// The status it was answered with.
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_lowercase()).map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub struct HttpReceiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    body: Arc<Mutex<String>>,
    location: Arc<Mutex<Option<String>>>,
    tasks: Option<JoinSet<()>>,
}

impl HttpReceiver {
    /// Starts on a free port, answering 200.
    pub async fn start() -> HttpReceiver {
        let mut r = HttpReceiver {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            received: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            body: Arc::new(Mutex::new("ok".into())),
            location: Arc::new(Mutex::new(None)),
            tasks: None,
        };
        r.up().await;
        r
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answer every request with `status` from now on.
    pub fn respond_with(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Answer successful requests with this body (JSON documents such as
    /// a JWKS) from now on.
    pub fn respond_body(&self, body: impl Into<String>) {
        *self.body.lock().unwrap() = body.into();
    }

    /// Answer with `status` and this `Location` (a redirect) from now on.
    pub fn redirect_to(&self, status: u16, location: impl Into<String>) {
        *self.location.lock().unwrap() = Some(location.into());
        self.respond_with(status);
    }

    /// Requests received so far (also those answered with an error).
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Stops listening and drops every open connection.
    pub async fn down(&mut self) {
        if let Some(mut tasks) = self.tasks.take() {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }

    /// Listens again on the same port.
    pub async fn up(&mut self) {
        self.down().await;
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let mut tasks = JoinSet::new();
        let (received, status, body, location) = (
            self.received.clone(),
            self.status.clone(),
            self.body.clone(),
            self.location.clone(),
        );
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                connections.spawn(serve(
                    socket,
                    received.clone(),
                    status.clone(),
                    body.clone(),
                    location.clone(),
                ));
            }
        });
        self.tasks = Some(tasks);
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        if let Some(tasks) = self.tasks.as_mut() {
            tasks.abort_all();
        }
    }
}

async fn serve(
    socket: TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    answer_body: Arc<Mutex<String>>,
    location: Arc<Mutex<Option<String>>>,
) {
    let mut reader = BufReader::new(socket);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
            return;
        };
        let (method, path) = (method.to_owned(), path.to_owned());
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_lowercase(), v.trim().to_owned());
            }
        }
        let length: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let code = status.load(Ordering::SeqCst);
        received.lock().unwrap().push(Received {
            method,
            path,
            headers,
            body,
            status: code,
        });
        let answer = if code == 200 {
            answer_body.lock().unwrap().clone()
        } else {
            "no".to_owned()
        };
        let location = location
            .lock()
            .unwrap()
            .as_ref()
            .map(|l| format!("location: {l}\r\n"))
            .unwrap_or_default();
        let response = format!(
            "HTTP/1.1 {code} X\r\ncontent-type: text/plain\r\n{location}content-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if reader
            .get_mut()
            .write_all(response.as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}
