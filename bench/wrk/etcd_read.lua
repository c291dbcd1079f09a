-- Reads of one hot key from etcd through its JSON gateway: POST /v3/kv/range, linearizable
-- (the default; "serializable": false).
--
--   wrk -t N -c N -s etcd_read.lua URL
--
-- Only a 200 whose body holds the key ("kvs") counts as ok (the key is written before the run).

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
local report = require("report")

setup = report.setup
done = report.done

function init(args)
   report.init_counters()
   req = wrk.format("POST", "/v3/kv/range", { ["Content-Type"] = "application/json" },
                    string.format('{"key":"%s"}', report.base64("bench/hot")))
end

function request()
   return req
end

function response(status, headers, body)
   if status == 200 and string.find(body, '"kvs"', 1, true) then
      ok = ok + 1
   else
      report.unexpected(status, body)
   end
end
