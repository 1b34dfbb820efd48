-- End-to-end test of editors/nvim in real Neovim. Run:
--   nvim --headless --clean -l tests/editors/nvim/test_nvim.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]
-- It starts a second Neovim (`--embed --headless`, the same binary) and drives it over RPC the way a
-- UI does, so keys go through the real main loop, insert mode and autocommands: the plugin attaches
-- phi-lsp to a Python buffer, we type a function head and docstring, wait for the ghost text,
-- compare it with `phi-lsp complete` at the same position, accept it with <Tab>, read the buffer,
-- and run :checkhealth phi_lsp.

local repo = vim.fn.fnamemodify(debug.getinfo(1, 'S').source:sub(2), ':p:h:h:h:h')
local bin = assert(arg[1], 'usage: test_nvim.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]')
local model = assert(arg[2], 'usage: test_nvim.lua PHI_LSP_BIN MODEL_DIR [auto|native|plugin]')
local mode = arg[3] or 'auto'
bin, model = vim.fn.fnamemodify(bin, ':p'), vim.fn.fnamemodify(model, ':p'):gsub('/$', '')
-- How the plugin is configured: setup() | lsp-config (vim.lsp.config only, 0.11+) | env (nothing:
-- phi-lsp on PATH and $PHI_LSP_MODEL, the working defaults).
local how = arg[4] or 'setup'
local plugin_dir = repo .. '/editors/nvim'
local version = tostring(vim.version())
local label = ('nvim %s %s/%s'):format(version, how, mode)
local typing = vim.json.decode(table.concat(vim.fn.readfile(repo .. '/tests/editors/typing.json'), '\n'))
local typed, max_new_tokens = typing.text, typing.maxNewTokens
if how == 'env' then
  max_new_tokens = nil -- the server's defaults
end

local passed, failed = 0, 0
-- io.write, not print: under -l, print puts its newline before the message, not after.
local function say(line)
  io.stdout:write(line, '\n')
end
local function check(ok, what, detail)
  if ok then
    passed = passed + 1
    say(('ok - %s: %s'):format(label, what))
  else
    failed = failed + 1
    say(('not ok - %s: %s%s'):format(label, what, detail and ('\n    ' .. detail:gsub('\n', '\n    ')) or ''))
  end
  return ok
end

local tmp = vim.fn.tempname()
vim.fn.mkdir(tmp, 'p')
local file = tmp .. '/sample.py'
vim.fn.writefile({}, file)

local child = vim.fn.jobstart({ vim.v.progpath, '--embed', '--headless', '--clean', '-n', '-i', 'NONE' }, {
  rpc = true,
  env = {
    XDG_STATE_HOME = tmp .. '/state',
    XDG_CONFIG_HOME = tmp .. '/config',
    XDG_DATA_HOME = tmp .. '/data',
    PATH = how == 'env' and (vim.fs.dirname(bin) .. ':' .. vim.env.PATH) or vim.env.PATH,
    PHI_LSP_MODEL = how == 'env' and model or nil,
  },
})
assert(child > 0, 'could not start ' .. vim.v.progpath)

local function lua(code, ...)
  return vim.rpcrequest(child, 'nvim_exec_lua', code, { ... })
end

local function wait_for(timeout_ms, fn)
  local value
  local ok = vim.wait(timeout_ms, function()
    value = fn()
    return value ~= nil and value ~= false and value ~= vim.NIL
  end, 50)
  return ok and value or nil
end

local function finish()
  pcall(vim.rpcrequest, child, 'nvim_command', 'qall!')
  vim.fn.jobwait({ child }, 5000)
  pcall(vim.fn.jobstop, child)
  say(('%s: %d passed, %d failed'):format(label, passed, failed))
  os.exit(failed == 0 and 0 or 1)
end

-- Load the plugin the way a plugin manager does: on the runtimepath, plugin/ sourced.
lua([[
  local plugin_dir, bin, model, mode, max_new_tokens, how = ...
  vim.opt.runtimepath:prepend(plugin_dir)
  vim.cmd.runtime('plugin/phi_lsp.lua')
  if how == 'env' then
    return
  elseif how == 'lsp-config' then
    vim.lsp.config('phi_lsp', {
      cmd = { bin, '--stdio' },
      settings = { ['phi-lsp'] = { model = model, maxNewTokens = max_new_tokens, deadlineMs = 60000 } },
    })
    return
  end
  require('phi_lsp').setup({
    cmd = { bin, '--stdio' },
    -- A long deadline makes the suggestion deterministic: it is never cut short by time.
    settings = { model = model, maxNewTokens = max_new_tokens, deadlineMs = 60000 },
    inline = mode,
  })
]], plugin_dir, bin, model, mode, max_new_tokens or vim.NIL, how)

local kind = lua([[return require('phi_lsp').inline_kind()]])
label = ('%s (%s ghost text)'):format(label, kind)
lua('vim.cmd.edit(...)', file)
local attached = wait_for(20000, function()
  return lua([[
    local c = require('phi_lsp').clients(0)[1]
    return c and c.initialized and {
      id = c.id,
      encoding = c.offset_encoding,
      inline = c.server_capabilities.inlineCompletionProvider ~= nil,
      menu = c.server_capabilities.completionProvider ~= nil,
    } or nil
  ]])
end)
if not check(attached ~= nil, 'phi_lsp attaches to a Python buffer', lua('return vim.bo.filetype')) then
  finish()
end

if kind == 'plugin' then
  -- Records, in order, the answers to inlineCompletion requests and the client's $/cancelRequest
  -- notifications: a cancel of a request already answered means the plugin lost track of it.
  lua([[
    local client = vim.lsp.get_client_by_id(...)
    _G.phi_test_events = {}
    local notify = client.rpc.notify
    client.rpc.notify = function(method, params, ...)
      if method == '$/cancelRequest' then
        table.insert(_G.phi_test_events, { 'cancel', params.id })
      end
      return notify(method, params, ...)
    end
    vim.api.nvim_create_autocmd('LspRequest', {
      callback = function(args)
        local request = args.data.request
        if args.data.client_id == client.id and request and request.type == 'complete'
            and request.method == 'textDocument/inlineCompletion' then
          table.insert(_G.phi_test_events, { 'answered', args.data.request_id })
        end
      end,
    })
  ]], attached.id)
end

local status = wait_for(60000, function()
  local s = lua([[
    local s = require('phi_lsp').status(nil, 2000)
    return s and s.state ~= 'loading' and s or nil
  ]])
  return s
end)
check(status and status.state == 'ready', 'phi-lsp/status reports the model ready', vim.inspect(status))
check(
  status and status.model and vim.fs.normalize(status.model) == vim.fs.normalize(model),
  'the model comes from the configuration (' .. how .. ')',
  vim.inspect(status and status.model)
)
check(attached.encoding == 'utf-8', 'position encoding is utf-8', attached.encoding)
check(attached.inline and not attached.menu, 'completionMode auto gives inline completion, no menu items',
  vim.inspect(attached))

-- Type a function head with its docstring, as a user does (autoindent off so the text is exact).
lua('vim.bo.autoindent = false; vim.bo.indentexpr = ""; vim.bo.smartindent = false')
local keys = 'i' .. typed:gsub('\n', '<CR>')
vim.rpcrequest(child, 'nvim_input', keys)

local function buffer_text()
  return lua([[return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), '\n')]])
end
local typed_ok = wait_for(5000, function()
  return buffer_text() == typed or nil
end)
check(typed_ok ~= nil, 'the keys reach the buffer', buffer_text())

local cursor = lua('return vim.api.nvim_win_get_cursor(0)')
local in_insert = lua('return vim.api.nvim_get_mode().mode')
check(in_insert == 'i', 'insert mode', in_insert)

-- The independent expected value: what the CLI suggests for the same text at the same position.
vim.fn.writefile(vim.split(typed, '\n'), tmp .. '/expected.py')
local line, character = cursor[1] - 1, cursor[2] -- ASCII: bytes are UTF-16 units
local cli_args = { bin, 'complete', tmp .. '/expected.py', '--model', model, '--line', tostring(line),
  '--character', tostring(character), '--json' }
if max_new_tokens then
  vim.list_extend(cli_args, { '--max-new-tokens', tostring(max_new_tokens), '--deadline-ms', '60000' })
end
local cli = vim.system(cli_args, { text = true }):wait(120000)
local expected = cli.code == 0 and vim.json.decode(cli.stdout).text or nil
if not check(expected and expected ~= '', 'phi-lsp complete gives a suggestion there',
    ('exit %s\n%s%s'):format(cli.code, cli.stdout, cli.stderr)) then
  finish()
end

local ghost_reader = [=[
  local kind = ...
  local ns = vim.api.nvim_get_namespaces()[kind == 'native' and 'nvim.lsp.inline_completion' or 'phi_lsp.ghost']
  if not ns then return nil end
  local marks = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })
  if #marks == 0 then return nil end
  local lines, groups = {}, {}
  local details = marks[1][4]
  local first = ''
  for _, chunk in ipairs(details.virt_text or {}) do
    first = first .. chunk[1]
    groups[chunk[2]] = true
  end
  lines[1] = first
  for _, virt_line in ipairs(details.virt_lines or {}) do
    local text = ''
    for _, chunk in ipairs(virt_line) do
      text = text .. chunk[1]
      groups[chunk[2]] = true
    end
    lines[#lines + 1] = text
  end
  return { text = table.concat(lines, '\n'), row = marks[1][2], col = marks[1][3], groups = vim.tbl_keys(groups) }
]=]
local function ghost()
  return lua(ghost_reader, kind)
end

local shown = wait_for(60000, ghost)
check(shown ~= nil, 'ghost text appears while typing')
if shown then
  -- Neovim stores control characters of virtual text as it shows them (^X): so must the expected.
  local displayed = expected:gsub('[%z\1-\8\11-\31\127]', function(c) return vim.fn.strtrans(c) end)
  check(shown.text == expected or shown.text == displayed, 'the ghost text is what `phi-lsp complete` suggests',
    ('ghost:    %q\nexpected: %q'):format(shown.text, expected))
  check(shown.row == line and shown.col == character, 'the ghost text sits at the cursor',
    vim.inspect({ shown.row, shown.col, cursor }))
  local group = kind == 'native' and 'ComplHint' or 'PhiLspGhostText'
  check(vim.tbl_contains(shown.groups, group), 'highlighted as ' .. group, vim.inspect(shown.groups))
end

if kind == 'plugin' then
  -- The plugin's own ghost text goes when the cursor moves away and when insert mode ends.
  vim.rpcrequest(child, 'nvim_input', '<Left>')
  local cleared = wait_for(3000, function()
    local state = lua([[
      local ns = vim.api.nvim_get_namespaces()['phi_lsp.ghost']
      return { col = vim.api.nvim_win_get_cursor(0)[2], marks = #vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {}) }
    ]])
    return state.col == character - 1 and state or nil
  end)
  check(cleared and cleared.marks == 0, 'moving the cursor clears the ghost text', vim.inspect(cleared))
  local events = lua('return _G.phi_test_events')
  local answered, stale = {}, {}
  for _, event in ipairs(events) do
    if event[1] == 'answered' then
      answered[event[2]] = true
    elseif answered[event[2]] then
      stale[#stale + 1] = event[2]
    end
  end
  check(next(answered) ~= nil and #stale == 0, 'no $/cancelRequest for a request already answered',
    ('stale cancels: %s\nevents: %s'):format(vim.inspect(stale), vim.inspect(events)))
  vim.rpcrequest(child, 'nvim_input', '<End>')
  check(wait_for(60000, ghost) ~= nil, 'ghost text comes back at the end of the line')
  vim.rpcrequest(child, 'nvim_input', '<Esc>')
  local left = wait_for(3000, function()
    local state = lua([[
      local ns = vim.api.nvim_get_namespaces()['phi_lsp.ghost']
      return { mode = vim.api.nvim_get_mode().mode, marks = #vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {}) }
    ]])
    return state.mode == 'n' and state or nil
  end)
  check(left and left.marks == 0, 'leaving insert mode clears the ghost text', vim.inspect(left))
  vim.rpcrequest(child, 'nvim_input', 'A')
  check(wait_for(60000, ghost) ~= nil, 'ghost text comes back on entering insert mode')
end

-- Accept with <Tab>: the suggestion goes into the buffer at the cursor, the cursor after it.
vim.rpcrequest(child, 'nvim_input', '<Tab>')
local want = typed .. expected
local accepted = wait_for(5000, function()
  return buffer_text() == want or nil
end)
check(accepted ~= nil, '<Tab> accepts: the buffer is the typed text plus the suggestion',
  ('buffer: %q\nwant:   %q'):format(buffer_text(), want))
if accepted then
  local after = lua('return vim.api.nvim_win_get_cursor(0)')
  local want_lines = vim.split(want, '\n')
  check(after[1] == #want_lines and after[2] == #want_lines[#want_lines], 'the cursor ends after the suggestion',
    vim.inspect({ after, #want_lines, #want_lines[#want_lines] }))
end

-- <Tab> with no suggestion is a plain <Tab>.
lua([[require('phi_lsp').set_enabled(false)]])
vim.rpcrequest(child, 'nvim_input', '<Esc>o<Tab>')
local tabbed = wait_for(3000, function()
  local l = lua([[return vim.api.nvim_get_current_line()]])
  return l:match('^%s+$')
end)
check(tabbed ~= nil, 'with no suggestion <Tab> is a plain <Tab>', vim.inspect(lua('return vim.api.nvim_get_current_line()')))
lua([[require('phi_lsp').set_enabled(true)]])
vim.rpcrequest(child, 'nvim_input', '<Esc>')

-- Neovim 0.12's native inline completion keeps the previous item, minus what was typed, until the
-- new answer comes (200 ms debounce plus latency). <Tab> right after a keystroke that does not
-- match it must not insert it at the old place; the new suggestion is then accepted at the cursor.
if kind == 'native' then
  lua([[vim.api.nvim_buf_set_lines(0, 0, -1, false, { 'def area(r):', '    """Area of a circle of radius r, café."""' })]])
  local prefix, typed = '    ', ' S'
  vim.rpcrequest(child, 'nvim_input', 'GA<CR>' .. prefix)
  local function ghost_at(col)
    return function()
      local g = ghost()
      if type(g) ~= 'table' then
        return nil -- (vim.NIL over RPC when there is none)
      end
      return g.row == 2 and g.col == col and g or nil
    end
  end
  local function line3()
    return lua([[return vim.api.nvim_buf_get_lines(0, 2, 3, false)[1] or '']])
  end
  local old = wait_for(60000, ghost_at(#prefix))
  if check(old ~= nil, 'a suggestion at the start of the function body') then
    local old_first = vim.split(old.text, '\n')[1]
    -- Keys in one input: the <Tab> comes before Neovim's debounce ends.
    vim.rpcrequest(child, 'nvim_input', typed .. '<Tab>')
    vim.wait(300)
    local fits = old_first:sub(1, #typed) == typed
    local want = fits and prefix .. old_first or prefix .. typed
    check(line3() == want, ('<Tab> right after %q does not insert the old suggestion at the old place'):format(typed),
      ('line:  %q\nwant:  %q\nold suggestion: %q'):format(line3(), want, old.text))
    if not fits then
      local col = lua('return vim.api.nvim_win_get_cursor(0)[2]')
      check(col == #prefix + #typed, 'the cursor stays after the typed text', tostring(col))
      local new = wait_for(60000, ghost_at(#prefix + #typed))
      if check(new ~= nil, 'the suggestion is asked for again at the cursor') then
        vim.rpcrequest(child, 'nvim_input', '<Tab>')
        local want_lines = vim.split(prefix .. typed .. new.text, '\n')
        local function rest()
          return lua([[return vim.api.nvim_buf_get_lines(0, 2, -1, false)]])
        end
        local got = wait_for(5000, function()
          return vim.deep_equal(rest(), want_lines) or nil
        end)
        check(got ~= nil, '<Tab> then accepts the new suggestion at the cursor',
          ('buffer: %s\nwant:   %s'):format(vim.inspect(rest()), vim.inspect(want_lines)))
      end
    end
  end
  vim.rpcrequest(child, 'nvim_input', '<Esc>')
end

-- The vimdoc, after the by-hand setup of :help phi-lsp-setup on a copy of the plugin (so that no
-- tags file lands in the repository): 'runtimepath' appended, then :helptags on its doc/. Then
-- :help phi-lsp opens the file at the *phi-lsp* tag, and the other tags are found.
local help = lua([[
  local doc_dir, out = ...
  vim.fn.mkdir(out .. '/doc', 'p')
  vim.fn.writefile(vim.fn.readfile(doc_dir .. '/doc/phi-lsp.txt', 'b'), out .. '/doc/phi-lsp.txt', 'b')
  vim.opt.runtimepath:append(out)
  local ok, err = pcall(vim.cmd, 'helptags ' .. vim.fn.fnameescape(out .. '/doc'))
  if not ok then return 'helptags: ' .. err end
  local found, e = pcall(vim.cmd.help, 'phi-lsp')
  if not found then return ':help phi-lsp: ' .. e end
  local line = vim.api.nvim_get_current_line()
  local name = vim.fs.basename(vim.api.nvim_buf_get_name(0))
  vim.cmd.helpclose()
  if name ~= 'phi-lsp.txt' or not line:find('*phi-lsp*', 1, true) then
    return (':help phi-lsp opened %s at %q, not the *phi-lsp* tag'):format(name, line)
  end
  for _, tag in ipairs({ 'phi_lsp.setup()', ':PhiLsp', 'phi-lsp-options', 'phi-lsp-partial', 'phi-lsp-manual',
    'phi_lsp.statusline()' }) do
    found, e = pcall(vim.cmd.help, tag)
    if not found then return tag .. ': ' .. e end
    vim.cmd.helpclose()
  end
  return 'ok'
]], plugin_dir, tmp .. '/help')
check(help == 'ok', 'after the documented setup (:helptags) :help phi-lsp opens at *phi-lsp*', help)

-- :checkhealth phi_lsp
local health = lua([[
  vim.cmd('checkhealth phi_lsp')
  return vim.api.nvim_buf_get_lines(0, 0, -1, false)
]])
local report = table.concat(health, '\n')
local oks = select(2, report:gsub('OK', ''))
check(oks >= 3 and not report:find('ERROR') and not report:find('WARNING'),
  ':checkhealth phi_lsp reports OK (Neovim, binary, model) with no warning or error', report)
say('    ' .. report:gsub('\n', '\n    '))

-- :PhiLsp status and :PhiLsp restart
local said = lua([[
  local messages = {}
  local notify = vim.notify
  vim.notify = function(msg) messages[#messages + 1] = msg end
  vim.cmd('PhiLsp status')
  vim.notify = notify
  return table.concat(messages, '\n')
]])
check(said:find('phi%-lsp ready') ~= nil and said:find('last suggestion') ~= nil, ':PhiLsp status reports the model and the last suggestion', said)
-- The latency in whole milliseconds, and the source of the answer as the server's status says it.
local last = lua([[local s = require('phi_lsp').status(nil, 2000); return s and s.last]])
local latency = said:match('last suggestion (%S+) ms')
check(latency ~= nil and (latency == '<1' or latency:match('^%d+$') ~= nil),
  ':PhiLsp status shows the latency in whole milliseconds', said)
check(not report:find('last suggestion [%d.]*%.%d') , ':checkhealth shows the latency in whole milliseconds', report)
local sources = { ['typed-through'] = 'from the cache', speculated = 'from the speculation',
  ['running-generation'] = 'from the generation still running' }
local source = type(last) == 'table' and sources[last.stop]
check(type(last) == 'table' and (source and said:find(source, 1, true) ~= nil
    or not source and said:find('generated') ~= nil and not said:find('from the', 1, true)),
  ':PhiLsp status says where the last answer came from (' .. tostring(type(last) == 'table' and last.stop) .. ')',
  ('status.last: %s\nsaid: %s'):format(vim.inspect(last), said))
-- Both kinds of answer, from figures as the server reports them.
local lines = lua([[
  local phi = require('phi_lsp')
  local base = { state = 'ready', model = 'm', device = 'cpu', dtype = 'q8_0' }
  local function with(last) return phi.describe(vim.tbl_extend('force', base, { last = last })) end
  return {
    speculated = with({ total_ms = 0.057615, from_cache = true, stop = 'speculated', prompt_tokens = 0 }),
    typed = with({ total_ms = 2.5, from_cache = true, stop = 'typed-through' }),
    model = with({ total_ms = 419.6, from_cache = false, stop = 'EndOfText', prompt_tokens = 40,
      reused_tokens = 32, generated_tokens = 8 }),
  }
]])
check(lines.speculated:find('last suggestion <1 ms (from the speculation)', 1, true) ~= nil,
  'a speculated answer of 0.057615 ms reads "<1 ms (from the speculation)"', lines.speculated)
check(lines.typed:find('last suggestion 3 ms (from the cache', 1, true) ~= nil,
  'a typed-through answer of 2.5 ms reads "3 ms (from the cache ...)"', lines.typed)
check(lines.model:find('last suggestion 420 ms (40 prompt tokens, 32 reused, 8 generated)', 1, true) ~= nil,
  'a generated answer of 419.6 ms reads "420 ms" with its tokens', lines.model)
-- :PhiLsp automatic flips only automatic, however the settings were configured (setup, lsp-config, env).
local function flipped(want)
  return wait_for(10000, function()
    local s = lua([[vim.notify = function() end; return require('phi_lsp').status(nil, 2000)]])
    return type(s) == 'table' and s.automatic == want and s or nil
  end)
end
lua([[vim.notify = function() end; vim.cmd('PhiLsp automatic')]])
local manual = flipped(false)
check(manual ~= nil and vim.fs.normalize(manual.model) == vim.fs.normalize(model)
    and (max_new_tokens == nil or manual.maxNewTokens == max_new_tokens),
  ':PhiLsp automatic turns automatic suggestions off and keeps the other settings', vim.inspect(manual))
lua([[vim.cmd('PhiLsp automatic')]])
check(flipped(true) ~= nil, ':PhiLsp automatic turns them back on')
vim.rpcrequest(child, 'nvim_command', 'PhiLsp restart')
local restarted = wait_for(30000, function()
  return lua([[
    local old = ...
    local c = require('phi_lsp').clients()[1] -- (the current buffer is :checkhealth's)
    if not c or c.id == old or not c.initialized or next(c.attached_buffers) == nil then return nil end
    local s = require('phi_lsp').status(c, 2000)
    return s and s.state == 'ready' and c.id or nil
  ]], attached.id)
end)
check(restarted ~= nil, ':PhiLsp restart starts a new server that loads the model', vim.inspect(restarted))

finish()
