//! A git server over smart HTTP for the tests: `git http-backend` (git's own CGI program) behind
//! a small HTTP/1.1 server that demands a token as HTTP basic authentication, as GitHub and
//! GitLab do.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine as _;

use super::GitRepo;

/// `git http-backend` (git's own smart-HTTP CGI program) behind an HTTP/1.1 server on a free
/// local port that answers 401 unless the request carries the token as its basic-auth password.
pub struct GitHttpServer {
    root: tempfile::TempDir,
    /// The address the URLs name.
    host: String,
    port: u16,
    /// The user names that came with the right token.
    users: Arc<Mutex<Vec<String>>>,
}

impl GitHttpServer {
    /// A server on this machine's loopback address.
    pub fn start(token: &'static str) -> Self {
        Self::start_on(token, "127.0.0.1")
    }

    /// A server listening on `host` (an address of this machine), which its URLs name.
    pub fn start_on(token: &'static str, host: &str) -> Self {
        let exec_path = Command::new("git").arg("--exec-path").output().unwrap();
        let exec_path = String::from_utf8_lossy(&exec_path.stdout)
            .trim()
            .to_string();
        assert!(
            Path::new(&exec_path).join("git-http-backend").exists(),
            "git-http-backend is not in {exec_path}: install git's full package (Debian: git)"
        );
        let root = tempfile::Builder::new()
            .prefix("kommit-git-http-")
            .tempdir()
            .unwrap();
        let listener = TcpListener::bind((host, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let users = Arc::new(Mutex::new(Vec::new()));
        let (project_root, seen) = (root.path().to_path_buf(), users.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (project_root, seen) = (project_root.clone(), seen.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &project_root, token, &seen);
                });
            }
        });
        GitHttpServer {
            root,
            host: host.to_string(),
            port,
            users,
        }
    }

    /// Publishes `repo` as a bare repository; returns its URL.
    pub fn publish(&self, repo: &GitRepo, name: &str) -> String {
        let bare = self.root.path().join(name);
        let out = Command::new("git")
            .args(["clone", "-q", "--bare", repo.path_str()])
            .arg(&bare)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    /// Pushes the repository's main branch to its published copy again.
    pub fn update(&self, repo: &GitRepo, name: &str) {
        let bare = self.root.path().join(name);
        repo.git(&["push", "-q", "-f", bare.to_str().unwrap(), "main:main"]);
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}:{}/{name}", self.host, self.port)
    }

    pub fn users(&self) -> Vec<String> {
        self.users.lock().unwrap().clone()
    }
}

/// One request: check the token, run the CGI program, relay its answer; one request per
/// connection (`Connection: close`).
fn serve(
    stream: TcpStream,
    project_root: &Path,
    token: &str,
    seen: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        read_chunked(&mut reader)?
    } else {
        let length = header("content-length").map_or(0, |v| v.parse().unwrap_or(0));
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        body
    };
    let mut stream = stream;
    let user = header("authorization")
        .and_then(|v| v.strip_prefix("Basic ").map(str::to_string))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            let (user, password) = pair.split_once(':')?;
            (password == token).then(|| user.to_string())
        });
    let Some(user) = user else {
        return stream.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
              Content-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    seen.lock().unwrap().push(user.clone());

    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut cgi = Command::new("git");
    cgi.arg("http-backend")
        .env("GIT_PROJECT_ROOT", project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", project_root)
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type").unwrap_or_default())
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_USER", &user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(protocol) = header("git-protocol") {
        cgi.env("HTTP_GIT_PROTOCOL", protocol);
    }
    if let Some(encoding) = header("content-encoding") {
        cgi.env("HTTP_CONTENT_ENCODING", encoding);
    }
    let mut child = cgi.spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&body));
    let output = child.wait_with_output()?;
    let _ = writer.join();

    // CGI answers with headers (maybe a Status line), a blank line, then the body.
    let out = output.stdout;
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            out.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        })
        .unwrap_or((out.len(), out.len()));
    let (cgi_headers, cgi_body) = (&out[..split.0], &out[split.1..]);
    let mut status = "200 OK".to_string();
    let mut response_headers = String::new();
    for line in String::from_utf8_lossy(cgi_headers).lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_string();
            }
            Some(_) => {
                response_headers.push_str(line.trim_end());
                response_headers.push_str("\r\n");
            }
            None => {}
        }
    }
    stream.write_all(
        format!(
            "HTTP/1.1 {status}\r\n{response_headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            cgi_body.len()
        )
        .as_bytes(),
    )?;
    stream.write_all(cgi_body)
}

fn read_chunked(reader: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let size =
            usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if size == 0 {
            let mut trailer = String::new();
            while reader.read_line(&mut trailer)? > 0 && trailer != "\r\n" {
                trailer.clear();
            }
            return Ok(body);
        }
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk)?;
        body.extend_from_slice(&chunk[..size]);
    }
}
