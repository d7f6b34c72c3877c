use super::*; pub async fn handle(p: &Proxy, _r: &crate::config::Route, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> { p.passthrough(req, conn).await }
