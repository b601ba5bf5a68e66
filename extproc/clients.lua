-- Envoy's key check (deploy/envoy.yaml's two Lua filters), as the sidecar sends it over ADS: the
-- sidecar puts `local STAGE, KEYS = ...` before this text (extproc/clients.py: the key hashes, each
-- with its tenant, whether it has limits, and its models as patterns), so a config reload changes
-- the keys and the table is built once per worker, not per request.
--
-- Stage "key" (before the body is read): the caller's key, hashed (SHA-256: the Lua filter has no
-- digest function) and looked up. None listed: a 401 in the caller's API's shape, before anything
-- is routed. A listed key: its tenant for the sidecar (x-gateway-tenant; client copies are removed
-- before this filter) and, as metadata, for the rate limits and the access-log service.
-- Stage "models" (after json_to_metadata read the body's model): the key's model allow-list.
local band, bor, bxor, bnot, rshift, lshift, ror, tobit, tohex =
  bit.band, bit.bor, bit.bxor, bit.bnot, bit.rshift, bit.lshift, bit.ror, bit.tobit, bit.tohex
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2}
local function sha256(msg)
  local n = #msg  -- a header value: its length in bits fits in the low 32 of the 64-bit length
  local bits = n * 8
  msg = msg .. "\128" .. string.rep("\0", (55 - n) % 64) .. "\0\0\0\0" ..
        string.char(band(rshift(bits, 24), 255), band(rshift(bits, 16), 255), band(rshift(bits, 8), 255), band(bits, 255))
  local h0, h1, h2, h3, h4, h5, h6, h7 =
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19
  local w = {}
  for off = 1, #msg, 64 do
    for i = 0, 15 do
      local a, b, c, d = string.byte(msg, off + i * 4, off + i * 4 + 3)
      w[i] = bor(lshift(a, 24), lshift(b, 16), lshift(c, 8), d)
    end
    for i = 16, 63 do
      local x, y = w[i - 15], w[i - 2]
      w[i] = tobit(w[i - 16] + bxor(ror(x, 7), ror(x, 18), rshift(x, 3)) + w[i - 7] +
                   bxor(ror(y, 17), ror(y, 19), rshift(y, 10)))
    end
    local a, b, c, d, e, f, g, h = h0, h1, h2, h3, h4, h5, h6, h7
    for i = 0, 63 do
      local t1 = tobit(h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(band(e, f), band(bnot(e), g)) + K[i + 1] + w[i])
      local t2 = tobit(bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bxor(band(a, b), band(a, c), band(b, c)))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    h0, h1, h2, h3 = tobit(h0 + a), tobit(h1 + b), tobit(h2 + c), tobit(h3 + d)
    h4, h5, h6, h7 = tobit(h4 + e), tobit(h5 + f), tobit(h6 + g), tobit(h7 + h)
  end
  return tohex(h0) .. tohex(h1) .. tohex(h2) .. tohex(h3) .. tohex(h4) .. tohex(h5) .. tohex(h6) .. tohex(h7)
end
local function credential(headers)
  local auth = headers:get("authorization")
  if auth ~= nil then
    local scheme, token = auth:match("^(%S+)%s+(%S+)%s*$")
    if scheme ~= nil and scheme:lower() == "bearer" then return token end
  end
  return headers:get("x-api-key")
end
local REFUSALS = {
  [401] = {"invalid_api_key", "authentication_error",
           "a valid API key is required: this gateway takes only the keys its clients section lists"},
  [403] = {"model_not_allowed", "permission_error", "this API key may not use this model"}}
-- The refusal in the caller's API's shape: Anthropic Messages, or OpenAI's (Chat and Responses alike).
-- The refusal first marks the request and has its route found again: the compiled routes send a marked
-- request to a route without the processor, so Envoy's reply opens no ext_proc stream to the sidecar.
local function refuse(handle, status)
  local code, kind, message = unpack(REFUSALS[status])
  handle:headers():replace("x-gateway-refused", tostring(status))
  handle:clearRouteCache()
  local body
  if (handle:headers():get(":path") or ""):find("^/v1/messages") then
    body = '{"type":"error","error":{"type":"' .. kind .. '","message":"' .. message .. '"}}'
  else
    body = '{"error":{"message":"' .. message .. '","type":"invalid_request_error","param":null,"code":"' .. code .. '"}}'
  end
  handle:respond({[":status"] = tostring(status), ["content-type"] = "application/json",
                  ["www-authenticate"] = status == 401 and "Bearer" or nil}, body)
end
-- Stage "key" (before the body is read): the key. Stage "models" (after json_to_metadata read the
-- body's model): the key's model allow-list.
function envoy_on_request(handle)
  local meta = handle:streamInfo():dynamicMetadata()
  if STAGE == "models" then
    local seen = meta:get("llm_gateway")
    local client = seen ~= nil and seen.client ~= nil and KEYS[seen.client] or nil
    if client == nil or type(seen.model) ~= "string" then return end
    for _, pattern in ipairs(client.models) do
      if seen.model:find(pattern) then return end
    end
    return refuse(handle, 403)
  end
  local key = credential(handle:headers())
  local digest = key ~= nil and sha256(key) or nil
  local client = digest ~= nil and KEYS[digest] or nil
  if client == nil then return refuse(handle, 401) end
  handle:headers():replace("x-gateway-tenant", client.tenant)
  meta:set("llm_gateway", "tenant", client.tenant)
  if client.models then meta:set("llm_gateway", "client", digest) end
  if client.limited then meta:set("llm_gateway", "limited", client.tenant) end
end
